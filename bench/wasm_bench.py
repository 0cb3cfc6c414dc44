"""Per-call cost of a wasm filter, in process: N calls through a chain holding one filter
against the same chain with no filter, reported as microseconds per call (best of R runs;
CPU time of this process, so other load on the machine skews it less than wall time).

    python bench/wasm_bench.py [--calls 20000] [--runs 5] [--filter FILE --root-id ID]
                               [--headers realistic|minimal] [--concurrency N] [--native-only]

By default it measures the AssemblyScript `add_header` example (wasm_examples/build, see
wasm_examples/build.sh) and the hand-written WAT one, each through the fast native boundary
and through wasmtime-py's public API (what the host did before the native path).

The default call looks like one the sidecar serves: a 1 KiB POST with the headers a mesh
request carries and a reply with nginx's headers; `--headers minimal` is a bare GET.
`--concurrency 64` keeps 64 calls in flight, each waiting once for its "upstream", as the
sidecar does at saturation (bench.quick): a filter's per-stream state then lives 64 at a
time (the AssemblyScript SDK's debug logs, for one, list every live context per call).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from filters.wasm.filter import WasmConfig, WasmFilter, load_plugin
from sidecar.call import Call, Next
from sidecar.chain import FilterContext, compose
from sidecar.messages import Request, Response, fixed_body

REPO = Path(__file__).resolve().parents[1]
BODY = b"x" * 1024
SHAPES = {
    # (method, request headers, request body, response headers, response body)
    "minimal": (
        b"GET",
        [(b"user-agent", b"bench"), (b"accept", b"*/*"), (b"x-request-id", b"abc")],
        b"",
        [(b"content-type", b"text/plain")],
        b"ok",
    ),
    "realistic": (
        b"POST",
        [
            (b"user-agent", b"wrk/4.2.0"),
            (b"accept", b"*/*"),
            (b"content-type", b"application/octet-stream"),
            (b"content-length", b"1024"),
            (b"x-forwarded-for", b"10.1.2.3"),
            (b"x-forwarded-proto", b"http"),
            (b"x-request-id", b"5f0c6f8e-7a3b-4f51-9a0e-2d7f1c9b8a41"),
            (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
        BODY,
        [
            (b"server", b"nginx/1.24.0"),
            (b"date", b"Tue, 02 Jun 2026 10:00:00 GMT"),
            (b"content-type", b"application/octet-stream"),
            (b"content-length", b"1024"),
        ],
        BODY,
    ),
}


def _terminal_for(shape: str, concurrency: int) -> Next:
    _, _, _, headers, body = SHAPES[shape]

    async def terminal(call: Call) -> Response:
        if concurrency > 1:
            await asyncio.sleep(0)  # the upstream round trip: other calls run meanwhile
        return Response(200, list(headers), fixed_body(body))

    return terminal


async def _run(chain: Next, calls: int, shape: str, concurrency: int) -> float:
    method, headers, body, _, _ = SHAPES[shape]

    async def caller(count: int) -> None:
        for _ in range(count):
            req = Request(method, b"/bench", b"svc", list(headers), fixed_body(body))
            call = Call(req, "inbound", "svc", b"svc", req.path, 1 << 20)
            response = await chain(call)
            assert response.status == 200

    clock = time.process_time
    start = clock()
    if concurrency > 1:
        share = max(1, calls // concurrency)
        await asyncio.gather(*(caller(share) for _ in range(concurrency)))
        calls = share * concurrency
    else:
        await caller(calls)
    return (clock() - start) / calls * 1e6


def _chain(
    path: Path | None, root_id: str, native: bool, shape: str, concurrency: int = 1
) -> tuple[Next, WasmFilter | None]:
    terminal = _terminal_for(shape, concurrency)
    if path is None:
        return compose([], terminal), None
    config = WasmConfig(path=str(path), root_id=root_id, configuration="bench")
    plugin = load_plugin(config, FilterContext("inbound", "svc"), "bench", native=native)
    flt = WasmFilter(plugin, fail_open=False, buffer_bodies=False)
    flt.name = "bench"
    return compose([flt], terminal), flt


async def _measure(
    path: Path | None,
    root_id: str,
    native: bool,
    calls: int,
    runs: int,
    shape: str,
    concurrency: int,
) -> float:
    chain, flt = _chain(path, root_id, native, shape, concurrency)
    await _run(chain, min(calls, 500), shape, concurrency)  # warm up: instance, caches
    best = min([await _run(chain, calls, shape, concurrency) for _ in range(runs)])
    if flt is not None:
        probe = Call(
            Request(b"GET", b"/", b"svc", [], fixed_body()), "inbound", "svc", b"svc", b"/", 0
        )
        response = await chain(probe)
        assert len(response.headers) > len(SHAPES[shape][3]), "the filter added no header"
        flt.close()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--filter", type=Path, help="a filter to measure instead of the examples")
    parser.add_argument("--root-id", default="")
    parser.add_argument("--headers", choices=sorted(SHAPES), default="realistic")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight")
    parser.add_argument("--native-only", action="store_true", help="skip the public-API runs")
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
    shape, conc = args.headers, max(1, args.concurrency)
    baseline = asyncio.run(_measure(None, "", True, args.calls, args.runs, shape, conc))
    what = f"{shape} call" + (f", {conc} in flight" if conc > 1 else "")
    print(f"{'no-op chain (' + what + ')':40s} {baseline:8.1f} us/call")
    for label, path, root_id in targets:
        if not path.exists():
            print(f"{label}: {path} is missing (run wasm_examples/build.sh)", file=sys.stderr)
            continue
        for native in (True,) if args.native_only else (False, True):
            how = "native boundary" if native else "public wasmtime-py API"
            calls = args.calls if native else max(1, args.calls // 4)
            cost = asyncio.run(_measure(path, root_id, native, calls, args.runs, shape, conc))
            print(
                f"{label + ', ' + how:40s} {cost:8.1f} us/call  (+{cost - baseline:.1f} over no-op)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
