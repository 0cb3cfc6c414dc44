"""`opus-sidecar demo`: a two-service mesh on this machine, a few calls through it, and
what to try next.

Starts `inventory` and `payment` (small aiohttp apps, `sidecar.demo.apps`), each
behind its own sidecar, in a temporary directory that also holds the file registry,
the configs and every log. The demo then plays a client app: it calls
`payment.create` through payment's sidecar, and the payment app calls
`inventory.reserve` through the same sidecar. With `--once` it stops after the calls
(exit 0 when every call answered 200); otherwise it waits for Ctrl-C. Children are
always stopped and the directory removed on the way out.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from sidecar.demo.mesh import Mesh, start_mesh
from sidecar.demo.procs import Children, DemoError, child_env
from sidecar.demo.report import Call, displaced_warning, print_summary, run_calls

__all__ = ["main"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opus-sidecar demo", description="Run a two-service demo mesh on 127.0.0.1."
    )
    parser.add_argument("--once", action="store_true", help="make the calls, then stop and exit")
    parser.add_argument("--calls", type=int, default=5, metavar="N", help="calls to make (5)")
    parser.add_argument(
        "--outbound-port",
        type=int,
        default=0,
        metavar="PORT",
        help="payment's outbound port to ask for (the seed's 8080); a free one when busy",
    )
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, through every `finally`. Set for SIGINT
    # too: a shell starting us in the background may have left SIGINT ignored.
    raise KeyboardInterrupt


def _wait_until_stopped(children: Children) -> int:
    while True:
        exited = children.first_exited()
        if exited is not None:
            print(f"\n{exited.name} exited with status {exited.proc.returncode}; last lines "
                  f"of {exited.log_path}:\n{exited.tail()}", file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.5)


def _show_logs(mesh: Mesh, children: Children) -> None:
    for child in children.started:
        print(f"\n--- {child.log_path} (last lines) ---\n{child.tail()}", file=sys.stderr)
    for path in (mesh.payment.access_log, mesh.inventory.access_log):
        if path.exists():
            print(f"\n--- {path} ---\n{path.read_text(errors='replace')[-3000:]}", file=sys.stderr)


def _run(args: argparse.Namespace, children: Children, workdir: Path) -> int:
    print(f"Starting the demo mesh in {workdir} ...", flush=True)
    mesh = start_mesh(children, workdir, args.outbound_port)
    print(
        f"Mesh ready: payment and inventory, each behind a sidecar. The demo plays a client\n"
        f"app calling payment through payment's sidecar ({mesh.payment.outbound_url}); the\n"
        f"payment app calls inventory through the same sidecar.\n",
        flush=True,
    )
    warning = displaced_warning(mesh)
    if warning:
        # On stderr and boxed: the seed's snippet calls localhost:8080, and when that
        # port is someone else's, nothing else would tell the user their calls go there.
        print(f"{warning}\n", file=sys.stderr, flush=True)
    calls: list[Call] = run_calls(mesh, args.calls, sys.stdout)
    print_summary(mesh, calls, sys.stdout, show_logs=not args.once)
    ok = all(call.status == 200 for call in calls)
    if not ok:
        print("\nSome calls failed; sidecar and app logs follow.", file=sys.stderr)
        _show_logs(mesh, children)
    if args.once:
        return 0 if ok else 1
    print("\nThe mesh is running. Press Ctrl-C to stop it.", flush=True)
    return _wait_until_stopped(children)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.calls < 0:
        print("demo: --calls must be 0 or more", file=sys.stderr)
        return 2
    if not 0 <= args.outbound_port < 65536:
        print("demo: --outbound-port must be a port number", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="opus-demo-"))
    children = Children(child_env())
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, children, workdir)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and orphan a child.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            children.stop_all()
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
