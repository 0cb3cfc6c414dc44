"""Where a sidecar's time goes at saturation: py-spy samples the process while the load
runs; the raw (collapsed-stack) output is summed by leaf frame for self time and by
any frame for inclusive time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench import load

_LOCATION = re.compile(r" \((.*?):\d+\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame(raw: str) -> str:
    """`data_received (sidecar/listener.py:123)` -> `data_received (sidecar/listener.py)`."""
    m = _LOCATION.search(raw)
    if not m:
        return raw.strip()
    path = m.group(1)
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{raw[: m.start()].strip()} ({path})"


def summarize(raw_text: str, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the process
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return {"self": [], "inclusive": []}
    return {
        "self": [(f, 100.0 * n / total) for f, n in self_time.most_common(top)],
        "inclusive": [(f, 100.0 * n / total) for f, n in inclusive.most_common(top * 2)],
    }


def profile(
    pid: int, proto: str, url: str, seconds: float, workdir: Path, label: str
) -> dict[str, list[tuple[str, float]]]:
    tool = py_spy()
    if tool is None:
        raise load.LoadError("py-spy not installed (pip install py-spy)")
    out = workdir / f"profile-{label}.txt"
    argv = [
        "taskset",
        "-c",
        str(load.LOAD_CORE),
        tool,
        "record",
        "-p",
        str(pid),
        "-d",
        f"{seconds:g}",
        "-r",
        "200",
        "--nonblocking",
        "-f",
        "raw",
        "-o",
        str(out),
    ]
    errors: list[str] = []

    def drive() -> None:
        try:
            if proto == "h1":
                load.wrk(url, seconds + 1, workdir / "post.lua")
            else:
                load.h2load(url, seconds + 1, workdir / "body.bin")
        except load.LoadError as e:
            errors.append(str(e))

    driver = threading.Thread(target=drive)
    driver.start()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    driver.join(seconds + 40)
    if done.returncode != 0 or not out.exists():
        raise load.LoadError(f"py-spy failed: {done.stderr[-500:]}")
    if errors:
        raise load.LoadError(errors[0])
    return summarize(out.read_text())
