"""Raw-socket helpers for hostile-input tests: bytes in, bytes out, bounded in time."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import httpx

from tests.integration.conftest import Mesh, Proc


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def statuses(raw: bytes) -> list[int]:
    """The status codes of every HTTP/1.1 response head in `raw`."""
    return [int(line.split(b" ")[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def app_calls(app: Proc) -> int:
    """The echo app's own count of calls that reached it."""
    count: int = httpx.get(f"http://127.0.0.1:{app.ports['port']}/calls", timeout=5).json()["calls"]
    return count


def raw_app(mesh: Mesh, reply: bytes, name: str = "raw") -> tuple[Proc, Path]:
    """A tests.hostile.raw_app process answering `reply`; returns it and its count file."""
    reply_file = mesh.workdir / f"{name}.reply"
    reply_file.write_bytes(reply)
    count_file = mesh.workdir / f"{name}.count"
    count_file.touch()
    argv = [sys.executable, "-m", "tests.hostile.raw_app", "--reply-file", str(reply_file)]
    proc = Proc(name, [*argv, "--count-file", str(count_file)], mesh.workdir, None)
    mesh.procs.append(proc)
    return proc, count_file
