"""`python -m bench.ircount`: instructions per call (callgrind Ir) of one sidecar hop.

CPU seconds per call move with the machine's load; instruction counts do not, so this is
the figure to compare before and after a change to the data path (run it on each tree:
`PYTHONPATH=<tree> python -m bench.ircount ...`). The sidecar runs under valgrind's
callgrind with instrumentation off; h2load sends the warm-up calls, instrumentation
is switched on, the measured calls are sent one at a time on one connection, and the Ir total is
divided by their count. The upstream is nginx (outside valgrind).

    python -m bench.ircount --mode in --proto h1 --calls 200
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import configs, load
from bench.fleet import Fleet
from bench.procs import Server

_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)
START_TIMEOUT = 120.0  # the sidecar starts ~50x slower under valgrind


def _h2load(url: str, calls: int, proto: str, body: Path) -> None:
    argv = ["h2load", "-n", str(calls), "-c1", "-m1", "-d", str(body), url]
    if proto == "h1":
        argv.insert(1, "--h1")
    out = subprocess.run(argv, capture_output=True, timeout=600, check=True).stdout
    m = re.search(rb"(\d+) succeeded", out)
    if m is None or int(m.group(1)) != calls:
        raise SystemExit(f"h2load: not every call succeeded:\n{out.decode()}")


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def measure(mode: str, proto: str, calls: int, warmup: int, body_size: int) -> float:
    """Ir per call of the sidecar's `mode` hop ("in" or "out") over `proto`."""
    for tool in ("valgrind", "callgrind_control", "h2load", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="opus-ircount-"))
    body = load.write_body(workdir, body_size)
    fl = Fleet(workdir)
    try:
        up = fl._nginx(
            "upstream",
            1,
            lambda a, b: configs.nginx_upstream(workdir, "upstream", a, b, fl.docroot),
        )
        app_protocol = "h2c" if proto == "h2c" else "http1"
        port = up.ports[proto]
        cfg = configs.sidecar(
            workdir,
            "sidecar",
            app_port=port,
            app_protocol=app_protocol,
            services={"nginx": port},
            upstream_protocol=app_protocol,
        )
        ports = workdir / "sidecar.ports.json"
        out_file = workdir / "callgrind.out"
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_file}",
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--config",
            str(cfg),
            "--ports-file",
            str(ports),
        ]
        env_before = os.environ.get("PYTHONMALLOC")
        os.environ["PYTHONMALLOC"] = "malloc"  # valgrind sees each allocation; stable counts
        try:
            sc = fl._start("sidecar", argv, 0)
        finally:
            if env_before is None:
                os.environ.pop("PYTHONMALLOC")
            else:
                os.environ["PYTHONMALLOC"] = env_before
        _wait(sc, ports)
        path = "/bench" if mode == "in" else "/v1/invoke/nginx/bench"
        url = sc.url("inbound" if mode == "in" else "outbound", path)
        _h2load(url, warmup, proto, body)
        _callgrind(sc.proc.pid, "-i", "on")
        _h2load(url, calls, proto, body)
        _callgrind(sc.proc.pid, "-d")
        _callgrind(sc.proc.pid, "-i", "off")
        time.sleep(0.5)  # the dump is written asynchronously by the valgrind process
        total = sum(
            int(m.group(1))
            for f in workdir.glob("callgrind.out*")
            for m in [_TOTALS.search(f.read_bytes())]
            if m is not None
        )
        return total / calls
    finally:
        fl.stop()
        if not os.environ.get("IRCOUNT_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(workdir)


def _wait(server: Server, ports: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ports.exists():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"sidecar did not start: {server.log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    server.wait_ports_file(ports)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ircount", description=__doc__)
    p.add_argument("--mode", choices=("in", "out"), default="in")
    p.add_argument("--proto", choices=("h1", "h2c"), default="h1")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--body", type=int, default=1024)
    args = p.parse_args(argv)
    ir = measure(args.mode, args.proto, args.calls, args.warmup, args.body)
    print(f"{args.mode} {args.proto}: {ir:,.0f} Ir per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
