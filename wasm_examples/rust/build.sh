#!/usr/bin/env bash
# Build the Rust example with Debian's rustc and its wasm32 standard library:
#   apt-get install rustc libstd-rust-dev-wasm32
# Writes ../build/set_header_rust.wasm. Uses /usr/bin/rustc explicitly: a rustup rustc
# earlier on PATH usually lacks the wasm32 target.
set -euo pipefail
cd "$(dirname "$0")"
RUSTC="${RUSTC:-/usr/bin/rustc}"
mkdir -p ../build
out=../build/set_header_rust.wasm
if [ -f "$out" ] && [ "$out" -nt src/lib.rs ]; then
  exit 0
fi
"$RUSTC" --edition 2021 --target wasm32-unknown-unknown --crate-type cdylib -C opt-level=s \
  -C strip=symbols -o "$out" src/lib.rs
echo "built wasm_examples/build/set_header_rust.wasm"
