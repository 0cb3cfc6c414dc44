"""`opus-sidecar wasm run|inspect FILTER`: try a filter without a mesh.

`run` passes one sample request and response through the filter in process and prints
what it did: header changes, a local reply, logs, metrics, imports it called that this host
does not implement. `inspect` lists the module's ABI version, imports and exports.

Exit codes: 0 done; 1 the filter failed (a trap, a start failure); 2 bad arguments or
not a filter; 3 the filter failed to start for want of --root-id or --plugin-config
(diagnose.py), said in one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import wasmtime

from sidecar.sdk import Call, FilterContext, Headers, Request, Response, fixed_body

from .abi import LogLevel
from .cache import wasm_bytes
from .diagnose import Misconfigured
from .filter import WasmConfig, WasmFilter, load_plugin
from .native import WasmCallError
from .plugin import Unavailable
from .runtime import WasmRuntime
from .vm import LoadError, abi_version, implemented

PROG = "opus-sidecar wasm"
MISCONFIGURED = 3  # the filter failed to start for want of --root-id or --plugin-config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="run a filter on a sample request and response")
    run.add_argument("filter", metavar="FILTER", help="a .wasm or .wat file")
    run.add_argument("--plugin-config", default="", metavar="STRING|@FILE")
    run.add_argument("--root-id", default="")
    run.add_argument("--request-header", action="append", default=[], metavar="NAME:VALUE")
    run.add_argument("--response-header", action="append", default=[], metavar="NAME:VALUE")
    run.add_argument("--method", default="GET")
    run.add_argument("--path", default="/")
    run.add_argument("--authority", default="example")
    run.add_argument("--body", default="", help="the request body")
    run.add_argument("--response-status", type=int, default=200)
    run.add_argument("--response-body", default="sample response\n")
    run.add_argument("--log-level", default="trace", choices=[v.name.lower() for v in LogLevel])
    inspect = sub.add_parser("inspect", help="ABI version, imports and exports of a filter")
    inspect.add_argument("filter", metavar="FILTER")
    return parser


def _header(text: str) -> tuple[bytes, bytes]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:VALUE")
    return name.strip().lower().encode(), value.strip().encode()


def _show(pairs: Headers) -> str:
    return ", ".join(
        f"{k.decode(errors='replace')}: {v.decode(errors='replace')}" for k, v in pairs
    )


def _diff(label: str, before: Headers, after: Headers) -> list[str]:
    lines = [
        f"  - {label} {k.decode(errors='replace')}: {v.decode(errors='replace')}"
        for k, v in before
        if (k, v) not in after
    ]
    lines += [
        f"  + {label} {k.decode(errors='replace')}: {v.decode(errors='replace')}"
        for k, v in after
        if (k, v) not in before
    ]
    return lines


def _describe(ty: object) -> str:
    if isinstance(ty, wasmtime.FuncType):
        params = ", ".join(str(p) for p in ty.params)
        results = ", ".join(str(r) for r in ty.results)
        return f"({params}) -> ({results})"
    return type(ty).__name__.removesuffix("Type").lower()


def inspect(path: Path) -> int:
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, wasm_bytes(path))
    version = abi_version(module)
    print(f"{path}: proxy-wasm ABI {version or 'none (not a proxy-wasm module)'}")
    print("imports:")
    missing = []
    for imp in module.imports:
        ty = imp.type
        known = isinstance(ty, wasmtime.FuncType) and implemented(imp.module, imp.name or "", ty)
        note = "" if known else "   <- not implemented here (answers UNIMPLEMENTED)"
        if not known:
            missing.append(f"{imp.module}.{imp.name}")
        print(f"  {imp.module}.{imp.name} {_describe(ty)}{note}")
    print("exports:")
    for exp in module.exports:
        print(f"  {exp.name} {_describe(exp.type)}")
    print(f"unimplemented imports: {', '.join(missing) if missing else 'none'}")
    return 0 if version else 1


async def _run_once(flt: WasmFilter, args: argparse.Namespace) -> tuple[Response, list[Call]]:
    request_headers = [_header(h) for h in args.request_header]
    req = Request(
        args.method.encode(),
        args.path.encode(),
        args.authority.encode(),
        request_headers,
        fixed_body(args.body.encode()),
        peer="127.0.0.1:50000",
    )
    call = Call(req, "outbound", args.authority, args.authority.encode(), req.path, 1 << 20)
    upstream: list[Call] = []

    async def terminal(c: Call) -> Response:
        upstream.append(c)
        headers = [_header(h) for h in args.response_header]
        return Response(args.response_status, headers, fixed_body(args.response_body.encode()))

    response = await flt.handle(call, terminal)
    return response, upstream


def run(args: argparse.Namespace) -> int:
    config_text: str = args.plugin_config
    if config_text.startswith("@"):
        config_text = Path(config_text[1:]).read_text()
    logs: list[tuple[int, str]] = []
    config = WasmConfig(
        path=args.filter,
        root_id=args.root_id,
        configuration=config_text,
        log_level=args.log_level,
        buffer_bodies=True,
    )
    runtime = WasmRuntime(cache_dir=None)
    ctx = FilterContext("outbound", "cli", extra={"wasm_runtime": runtime})
    plugin = load_plugin(config, ctx, config.plugin_name())
    plugin.log_sink = lambda level, message: logs.append((level, message))
    flt = WasmFilter(plugin, fail_open=False, buffer_bodies=True)
    flt.name = Path(args.filter).name
    before_request = [_header(h) for h in args.request_header]
    before_response = [_header(h) for h in args.response_header]
    try:
        response, upstream = asyncio.run(_run_once(flt, args))
        failure = None
    except Exception as exc:  # FilterFailed (a trap, fail closed) or a start failure
        failure = exc
    print(f"filter: {args.filter} (ABI {abi_version(plugin.module) or '?'})")
    cause = _misconfigured(failure)
    if cause is not None:
        print(f"FAILED: {cause.for_cli()}")
    elif failure is not None:
        print(f"FAILED: {failure}")
    elif not upstream:
        print(f"local reply: {response.status}")
        print(f"  headers: {_show(response.headers)}")
        print(f"  body: {response.body.buffered_whole!r}")
    else:
        sent = upstream[0]
        print("request:")
        changes = _diff("header", before_request, list(sent.request.headers))
        if sent.path != args.path.encode():
            changes.append(f"  path: {args.path} -> {sent.path.decode(errors='replace')}")
        print("\n".join(changes) if changes else "  unchanged")
        print(f"response: {response.status}")
        changes = _diff("header", before_response, list(response.headers))
        if response.status != args.response_status:
            changes.append(f"  status: {args.response_status} -> {response.status}")
        print("\n".join(changes) if changes else "  unchanged")
    print("logs:" if logs else "logs: none")
    for level, message in logs:
        print(f"  [{logging.getLevelName(level).lower()}] {message}")
    metrics = list(plugin.metrics.by_id.values())
    print("metrics:" if metrics else "metrics: none")
    for metric in metrics:
        print(f"  {metric.name} = {metric.value}")
    if plugin.unimplemented:
        print(f"unimplemented imports called: {', '.join(sorted(plugin.unimplemented))}")
    flt.close()
    runtime.close()
    if cause is not None:
        # Last, so that it is what the terminal shows: the guest's logs above say the same
        # in the SDK's words, the trap's backtrace does not.
        print(f"{PROG}: {cause.for_cli()}", file=sys.stderr)
        return MISCONFIGURED
    return 1 if failure is not None else 0


def _misconfigured(failure: BaseException | None) -> Misconfigured | None:
    """The Misconfigured start failure behind `failure` (the FilterFailed raised while
    handling it), if any."""
    while failure is not None:
        if isinstance(failure, Misconfigured):
            return failure
        failure = failure.__cause__ or failure.__context__
    return None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "inspect":
            return inspect(Path(args.filter))
        return run(args)
    except (
        ValueError,
        OSError,
        wasmtime.WasmtimeError,
        LoadError,
        WasmCallError,
        Unavailable,
    ) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
