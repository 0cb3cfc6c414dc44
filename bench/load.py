"""Load generators, each pinned to the load core and bounded in time: wrk (HTTP/1.1
saturation), h2load (h2c saturation, fixed-rate h2c, fixed call counts) and the paced
HTTP/1.1 client (bench/paced.py).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LOAD_CORE = 1
# A fixed-rate run uses a fifth of a core; SCHED_FIFO keeps the other tenants of this
# shared machine from adding their scheduling delays to our percentiles.
RT = ["chrt", "-f", "1"]
SATURATION_CONNECTIONS = 64
H2_CLIENTS, H2_STREAMS = 8, 8  # 64 streams in flight over 8 connections
BURST_CALLS = 10  # calls arriving together in the burst case (every 10 ms at 1000/s)


class LoadError(RuntimeError):
    pass


@dataclass
class LoadResult:
    requests: int  # successful (2xx) calls
    seconds: float
    errors: int = 0
    latencies_us: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@functools.cache
def realtime_available() -> bool:
    try:
        return subprocess.run([*RT, "true"], capture_output=True, check=False).returncode == 0
    except OSError:
        return False


def _rt() -> list[str]:
    return RT if realtime_available() else []


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(
            ["taskset", "-c", str(LOAD_CORE), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"{argv[0]} ran past {timeout:.0f}s") from e
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"  # h2load's -D takes units; wrk only whole seconds


def write_wrk_script(workdir: Path, body_size: int) -> Path:
    path = workdir / "post.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {body_size})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return path


def write_body(workdir: Path, body_size: int) -> Path:
    path = workdir / "body.bin"
    path.write_bytes(b"x" * body_size)
    return path


def wrk(url: str, duration: float, script: Path) -> LoadResult:
    out = _run(
        [
            "wrk",
            "-t1",
            f"-c{SATURATION_CONNECTIONS}",
            f"-d{max(1, round(duration))}s",
            "-s",
            str(script),
            url,
        ],
        timeout=duration + 30,
    )
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise LoadError(f"wrk output not understood: {out[-800:]}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    total, seconds = int(m.group(1)), float(m.group(2)) * scale
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return LoadResult(total - (int(bad.group(1)) if bad else 0), seconds, errors)


def _h2load_summary(out: str) -> tuple[int, int, float]:
    m = re.search(r"finished in ([\d.]+)(\w+),", out)
    r = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    s = re.search(r"status codes: (\d+) 2xx", out)
    if not (m and r and s):
        raise LoadError(f"h2load output not understood: {out[-800:]}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
    return int(s.group(1)), int(r.group(2)), float(m.group(1)) * scale


def h2load(url: str, duration: float, body: Path, *, h1: bool = False) -> LoadResult:
    """Saturation: 64 calls in flight (HTTP/1.1: 64 connections; h2c: 8 x 8 streams)."""
    shape = (
        ["--h1", f"-c{SATURATION_CONNECTIONS}", "-m1"]
        if h1
        else [f"-c{H2_CLIENTS}", f"-m{H2_STREAMS}"]
    )
    out = _run(
        ["h2load", "-t1", *shape, "-D", _ms(duration), "-d", str(body), url],
        timeout=duration + 30,
    )
    ok, failed, seconds = _h2load_summary(out)
    return LoadResult(ok, seconds, failed)


def h2load_count(url: str, calls: int, concurrency: int, body: Path, *, h1: bool) -> LoadResult:
    """Exactly `calls` calls from `concurrency` callers (one connection each)."""
    proto = ["--h1"] if h1 else []
    out = _run(
        ["h2load", "-t1", *proto, f"-c{concurrency}", "-m1", f"-n{calls}", "-d", str(body), url],
        timeout=120,
    )
    ok, failed, seconds = _h2load_summary(out)
    return LoadResult(ok, seconds, failed)


def paced(
    url: str, rate: int, duration: float, body_size: int, *, proto: str = "h1", burst: int = 1
) -> LoadResult:
    """A fixed rate through bench/paced.py: evenly paced (one call in flight per
    connection) or, with `burst`, that many calls sent together at each tick."""
    out = _run(
        [*_rt(), sys.executable, "-m", "bench.paced", url, "--rate", str(rate),
         "--duration", f"{duration:g}", "--body-size", str(body_size), "--proto", proto,
         "--burst", str(burst)],
        timeout=duration + 30,
    )  # fmt: skip
    data = json.loads(out)
    latencies = [x * 1e6 for x in data["latencies"]]
    return LoadResult(len(latencies), data["elapsed"], data["error_count"], latencies)
