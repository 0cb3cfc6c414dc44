"""Child processes of the demo: start them, wait on real readiness signals, stop them.

Every wait is bounded and polls a real signal (a ports file written once the child
is listening, an HTTP status); a child that exits while we wait fails the wait at
once, with the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.demo import _http

POLL_INTERVAL = 0.05
PR_SET_PDEATHSIG = 1


class DemoError(Exception):
    """The demo mesh could not start or misbehaved; the message says what and where."""


def _die_with_parent() -> None:
    # Runs in the child before exec: if the demo is killed outright (SIGKILL, a test
    # timeout), the kernel sends the child SIGTERM rather than leaving it running.
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise DemoError(
                f"{self.name} exited with status {code}; last lines of {self.log_path}:\n"
                f"{self.tail()}"
            )


@dataclass
class Children:
    """The demo's children, in start order; `stop_all()` stops them in reverse."""

    env: dict[str, str]
    started: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], log_path: Path, **env: str) -> Child:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **env},
                # Its own process group: Ctrl-C in the terminal reaches only the demo,
                # which then stops the children in order.
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path)
        self.started.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((c for c in self.started if c.proc.poll() is not None), None)

    def stop_all(self, grace: float = 5.0) -> None:
        for child in reversed(self.started):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(self.started):
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        self.started.clear()


def wait_for_ports_file(child: Child, path: Path, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        child.check_alive()
        with contextlib.suppress(FileNotFoundError):
            ports: dict[str, int] = json.loads(path.read_text())
            return ports
        if time.monotonic() > deadline:
            raise DemoError(
                f"{child.name} did not write {path} within {timeout:.0f} s; "
                f"last lines of {child.log_path}:\n{child.tail()}"
            )
        time.sleep(POLL_INTERVAL)


def wait_for_http(child: Child, url: str, timeout: float, expect: str = "") -> str:
    """Poll `url` until it answers 200 (and its body contains every `expect` line)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        child.check_alive()
        try:
            reply = _http.request("GET", url, timeout=2.0)
            body = reply.body.decode(errors="replace")
            if reply.status == 200 and all(s in body for s in expect.splitlines()):
                return body
            last = f"HTTP {reply.status}: {body[:500]}"
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise DemoError(
                f"{child.name}: {url} not ready within {timeout:.0f} s (last: {last}); "
                f"last lines of {child.log_path}:\n{child.tail()}"
            )
        time.sleep(POLL_INTERVAL)


def port_is_free(port: int) -> bool:
    """Whether `port` can be bound on 127.0.0.1 and on the wildcard address."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As asyncio's servers do, so a socket in TIME_WAIT does not count as busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A port free right now. Only for a port another process must know before the
    listener binds it; anything else binds port 0 and reads the port back."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    """The environment children start with: ours, with this package importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # OPUS_* variables override sidecar config keys; the apps' variable is not one.
    env.pop("OPUS_SIDECAR_URL", None)
    return env
