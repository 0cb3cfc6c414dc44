"""Real processes on 127.0.0.1 for integration tests: apps, sidecars, and a mesh of both.

Every process binds port 0 and reports its ports through a file it writes once
listening; readiness is polled on the real signal (the file, then GET /ready).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, int]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists():
            data: dict[str, int] = json.loads(path.read_text())
            return data
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"no ports file after {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")


# Sockets bound and never listening, held for the whole run (see refusing_port).
_REFUSING: list[socket.socket] = []


def refusing_port() -> int:
    """A loopback port that provably refuses connections: bound (so no listener of this
    run can be handed it, as a port bound and closed again could be) but never listening,
    which the kernel answers with RST. Held until the test process exits."""
    if not _REFUSING:
        atexit.register(_release_refusing_ports)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _REFUSING.append(sock)
    return int(sock.getsockname()[1])


def _release_refusing_ports() -> None:
    for sock in _REFUSING:
        sock.close()
    _REFUSING.clear()


class Proc:
    def __init__(
        self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.ports_file = workdir / f"{name}.ports.json"
        self.ports_file.unlink(missing_ok=True)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*argv, "--ports-file", str(self.ports_file)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=full_env,
        )
        self.ports = _wait_for_file(self.ports_file, self.proc, self.log_path)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


class Sidecar(Proc):
    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.ports['outbound']}"

    @property
    def inbound(self) -> str:
        return f"http://127.0.0.1:{self.ports['inbound']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.admin}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"sidecar {self.name} not ready:\n{self.output()[-3000:]}")

    def access_log(self, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access-log records, once there are at least `count` (the line for a call
        is written just after its reply is sent, so a test polls for it)."""
        path = self.log_path.parent / f"{self.name}.access.log"
        deadline = time.monotonic() + timeout
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.02)

    def metrics(self) -> str:
        return httpx.get(f"{self.admin}/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a sample's values over series whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Mesh:
    """Starts apps and sidecars sharing one file registry; stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.registry = workdir / "registry"
        self.procs: list[Proc] = []
        self._count = 0

    def app(self, name: str = "echo") -> Proc:
        self._count += 1
        proc = Proc(
            f"app-{name}-{self._count}",
            [sys.executable, "-m", "tests.integration.echo_app", "--name", name],
            self.workdir,
            None,
        )
        self.procs.append(proc)
        return proc

    def sidecar(
        self,
        service: str,
        app_port: int,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> Sidecar:
        self._count += 1
        name = f"sidecar-{service}-{self._count}"
        config: dict[str, Any] = {
            "service": {"name": service, "instance_id": name},
            "app": {"host": "127.0.0.1", "port": app_port},
            "listeners": {
                "outbound": {"host": "127.0.0.1", "port": 0},
                "inbound": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0},
            },
            "discovery": {"backend": "file", "file": {"directory": str(self.registry)}},
            "log": {"level": "INFO", "access_log": str(self.workdir / f"{name}.access.log")},
            "drain_timeout": 5.0,
        }
        config = _deep_merge(config, extra or {})
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        sidecar = Sidecar(
            name, [sys.executable, "-m", "sidecar", "run", "--config", str(path)], self.workdir, env
        )
        self.procs.append(sidecar)
        if wait_ready:
            sidecar.wait_ready()
        return sidecar

    def service(self, service: str, extra: dict[str, Any] | None = None) -> tuple[Proc, Sidecar]:
        app = self.app(service)
        return app, self.sidecar(service, app.ports["port"], extra)

    def wait_endpoints(
        self, caller: Sidecar, service: str, count: int, timeout: float = 5.0
    ) -> None:
        """Poll the caller's /clusters until `service` has `count` endpoints (routes a call first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The probe may meet the caller's retry filter: a test's backoffs (2 s each
            # in test_resilience_mesh) must not time it out before the mesh answers.
            httpx.get(f"{caller.outbound}/v1/invoke/{service}/health", timeout=15)
            clusters = httpx.get(f"{caller.admin}/clusters", timeout=5).json()
            endpoints = clusters.get("outbound", {}).get(service, {}).get("endpoints", [])
            if len(endpoints) == count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{service} never had {count} endpoints at {caller.name}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.stop()
