"""The machine and tool versions a run is reported with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def describe() -> dict[str, str]:
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }
    for dist in ("uvloop", "h2", "httptools", "aiohttp", "protobuf"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    info["nginx"] = _first_line(["nginx", "-v"])
    info["haproxy"] = _first_line(["haproxy", "-v"])
    info["wrk"] = _first_line(["wrk", "-v"])
    info["h2load"] = _first_line(["h2load", "--version"])
    return info
