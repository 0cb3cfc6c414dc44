"""Servers under test: started pinned to one core, polled until ready, and read from /proc.

CPU is utime + stime of the process and its descendants (nginx's worker, for one);
RSS is VmRSS over the same tree.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0


class StartError(RuntimeError):
    pass


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (for servers that cannot bind 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise StartError(f"port {port} not open after {START_TIMEOUT}s: {log.read_text()[-2000:]}")


def wait_ports_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, int]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists():
            ports: dict[str, int] = json.loads(path.read_text())
            return ports
        if proc.poll() is not None:
            raise StartError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    raise StartError(f"no ports file after {START_TIMEOUT}s: {log.read_text()[-2000:]}")


class Server:
    """One server process pinned to `core` (a core number or a taskset list such as
    "0,1"); `ports` names its listening ports."""

    def __init__(self, name: str, argv: list[str], core: int | str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.ports: dict[str, int] = {}
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def wait_ports(self, ports: dict[str, int]) -> None:
        for port in ports.values():
            wait_port(port, self.proc, self.log_path)
        self.ports = ports

    def wait_ports_file(self, path: Path) -> None:
        self.ports = wait_ports_file(path, self.proc, self.log_path)

    def url(self, port_name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[port_name]}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Its own session: the signal reaches nginx's worker and nothing of ours.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
