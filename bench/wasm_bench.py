"""Per-call cost of a wasm filter, in process: N calls through a chain holding one filter
against the same chain with no filter, reported as microseconds per call (best of R runs;
CPU time of this process, so other load on the machine skews it less than wall time).

    python bench/wasm_bench.py [--calls 20000] [--runs 5] [--filter FILE --root-id ID]

By default it measures the AssemblyScript `add_header` example (wasm_examples/build, see
wasm_examples/build.sh) and the hand-written WAT one, each through the fast native boundary
and through wasmtime-py's public API (what the host did before the native path).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from filters.wasm.filter import WasmConfig, WasmFilter, load_plugin
from sidecar.chain import Call, FilterContext, Next, compose
from sidecar.proto.messages import Request, Response, fixed_body

REPO = Path(__file__).resolve().parents[1]
HEADERS = [(b"user-agent", b"bench"), (b"accept", b"*/*"), (b"x-request-id", b"abc")]


async def _terminal(call: Call) -> Response:
    return Response(200, [(b"content-type", b"text/plain")], fixed_body(b"ok"))


async def _run(chain: Next, calls: int) -> float:
    clock = time.process_time
    start = clock()
    for _ in range(calls):
        req = Request(b"GET", b"/bench", b"svc", list(HEADERS), fixed_body(b""))
        call = Call(req, "outbound", "svc", b"svc", req.path, 1 << 20)
        response = await chain(call)
        assert response.status == 200
    return (clock() - start) / calls * 1e6


def _chain(path: Path | None, root_id: str, native: bool) -> tuple[Next, WasmFilter | None]:
    if path is None:
        return compose([], _terminal), None
    config = WasmConfig(path=str(path), root_id=root_id, configuration="bench")
    plugin = load_plugin(config, FilterContext("outbound", "svc"), "bench", native=native)
    flt = WasmFilter(plugin, fail_open=False, buffer_bodies=False)
    flt.name = "bench"
    return compose([flt], _terminal), flt


async def _measure(path: Path | None, root_id: str, native: bool, calls: int, runs: int) -> float:
    chain, flt = _chain(path, root_id, native)
    await _run(chain, min(calls, 500))  # warm up: first instance, caches
    best = min([await _run(chain, calls) for _ in range(runs)])
    if flt is not None:
        probe = Call(
            Request(b"GET", b"/", b"svc", [], fixed_body()), "outbound", "svc", b"svc", b"/", 0
        )
        response = await chain(probe)
        assert len(response.headers) > 1, "the filter added no header"
        flt.close()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--filter", type=Path, help="a filter to measure instead of the examples")
    parser.add_argument("--root-id", default="")
    args = parser.parse_args(argv)
    if args.filter is not None:
        targets = [(args.filter.name, args.filter, args.root_id)]
    else:
        targets = [
            (
                "AssemblyScript add_header",
                REPO / "wasm_examples/build/add_header.wasm",
                "add_header",
            ),
            ("WAT add_header", REPO / "wasm_examples/wat/add_header.wat", ""),
        ]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    baseline = asyncio.run(_measure(None, "", True, args.calls, args.runs))
    print(f"{'no-op chain':40s} {baseline:8.1f} us/call")
    for label, path, root_id in targets:
        if not path.exists():
            print(f"{label}: {path} is missing (run wasm_examples/build.sh)", file=sys.stderr)
            continue
        for native in (False, True):
            how = "native boundary" if native else "public wasmtime-py API"
            calls = args.calls if native else max(1, args.calls // 4)
            cost = asyncio.run(_measure(path, root_id, native, calls, args.runs))
            print(
                f"{label + ', ' + how:40s} {cost:8.1f} us/call  (+{cost - baseline:.1f} over no-op)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
