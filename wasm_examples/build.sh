#!/usr/bin/env bash
# Build the AssemblyScript example filters into wasm_examples/build/*.wasm.
# Idempotent: `npm ci` installs the exact versions in package-lock.json (only when
# node_modules is missing or older than the lockfile); a filter is rebuilt only when its
# source (or the shared config.ts) is newer than its .wasm.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  npm ci --no-audit --no-fund
  touch node_modules
fi

mkdir -p build
# Compiles run side by side (binaryen's optimizer is slow); any failure fails the build.
pids=()
for src in assemblyscript/*.ts; do
  name="$(basename "$src" .ts)"
  [ "$name" = config ] && continue
  out="build/$name.wasm"
  if [ -f "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt assemblyscript/config.ts ]; then
    continue
  fi
  # --use abort=abort_proc_exit routes AssemblyScript's abort into the SDK (log + proc_exit).
  (
    npx --no-install asc "$src" -b "$out.tmp" --use abort=abort_proc_exit --optimize
    mv "$out.tmp" "$out"
    echo "built $out"
  ) &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit "$status"
