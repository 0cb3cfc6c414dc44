"""Sidecars discovering each other through Nacos, end to end.

Runs against the Nacos emulator (tests/emulators/nacos_emulator.py, which follows
Nacos's v1 and v2 Open API pages) started as a real process on 127.0.0.1 port 0, with
instances turning unhealthy 2 s after their last beat rather than Nacos's 15 s; set
NACOS_ADDR to run the same cases against a real Nacos (the 1.x-fallback case, which
needs the emulator's v1-only mode, is skipped there).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Mesh, Proc, Sidecar

pytestmark = pytest.mark.integration

REAL_NACOS = os.environ.get("NACOS_ADDR", "")
HTTP = httpx.Client(timeout=5)  # kept: a fresh connection per call costs ~50 ms here


@pytest.fixture(autouse=True, scope="module")
def _close_http() -> Iterator[None]:
    yield
    HTTP.close()


def _nacos(mesh: Mesh, *flags: str) -> str:
    if REAL_NACOS:
        return REAL_NACOS
    argv = [
        sys.executable,
        "-m",
        "tests.emulators.nacos_emulator",
        "--port",
        "0",
        "--unhealthy-after",
        "2",
        "--delete-after",
        "4",
        *flags,
    ]
    proc = Proc("nacos", argv, mesh.workdir, None)
    mesh.procs.append(proc)
    return f"http://127.0.0.1:{proc.ports['port']}"


def _extra(address: str, **nacos: Any) -> dict[str, Any]:
    settings = {
        "address": address,
        "namespace": "opus-test",
        "group": "MESH",
        "beat_interval": 1.0,
        "poll_interval": 0.1,
        **nacos,
    }
    return {"discovery": {"backend": "nacos", "nacos": settings}}


def _service(mesh: Mesh, name: str, extra: dict[str, Any]) -> tuple[Proc, Sidecar]:
    app = mesh.app(name)
    return app, mesh.sidecar(name, app.ports["port"], extra)


def _inbound(sidecar: Sidecar) -> str:
    return f"127.0.0.1:{sidecar.ports['inbound']}"


def _addresses(caller: Sidecar) -> set[str]:
    clusters = HTTP.get(f"{caller.admin}/clusters").json()
    return {
        e["address"] for e in clusters.get("outbound", {}).get("orders", {}).get("endpoints", [])
    }


def _call(caller: Sidecar) -> httpx.Response:
    return HTTP.get(f"{caller.outbound}/v1/invoke/orders/x")


def test_register_route_kill_and_deregister(mesh: Mesh) -> None:
    address = _nacos(mesh)
    extra = _extra(address)
    _, first = _service(mesh, "orders", extra)
    retry = {
        "filters": {
            "outbound": [{"name": "retry", "config": {"max_retries": 2, "retry_delay": 0.01}}]
        }
    }
    _, caller = _service(mesh, "payment", {**extra, **retry})
    mesh.wait_endpoints(caller, "orders", 1)
    app2, second = _service(mesh, "orders", extra)
    ready_at = time.monotonic()
    while time.monotonic() - ready_at < 5.0:
        if _call(caller).headers.get("x-opus-upstream") == _inbound(second):
            break
    routed_after = time.monotonic() - ready_at
    assert routed_after < 1.0
    failures: list[int] = []
    killed_at = gone_at = 0.0
    start = time.monotonic()
    for i in range(5000):
        now = time.monotonic()
        if now - start > 8.0 or (gone_at and now - gone_at > 0.5):
            break
        if i == 20:
            app2.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        resp = _call(caller)
        if resp.status_code != 200:
            failures.append(resp.status_code)
        if killed_at and not gone_at and _inbound(second) not in _addresses(caller):
            gone_at = time.monotonic()
    assert killed_at and gone_at
    print(
        f"\nnacos: new instance routed after {routed_after * 1000:.0f} ms; killed app gone "
        f"from the caller after {(gone_at - killed_at) * 1000:.0f} ms; {len(failures)} failed"
    )
    assert failures == []
    assert gone_at - killed_at < 1.5  # app probe every 1 s, deregister, the caller's 0.1 s poll
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    deadline = time.monotonic() + 2.0
    while _inbound(first) in _addresses(caller) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _inbound(first) not in _addresses(caller)


@pytest.mark.skipif(bool(REAL_NACOS), reason="needs the emulator's v1-only mode")
def test_nacos_1x_server_through_v1_paths(mesh: Mesh) -> None:
    address = _nacos(mesh, "--v1-only")
    extra = _extra(address)
    _, callee = _service(mesh, "orders", extra)
    _, caller = _service(mesh, "payment", extra)
    mesh.wait_endpoints(caller, "orders", 1)
    resp = _call(caller)
    assert resp.status_code == 200 and resp.headers["x-opus-upstream"] == _inbound(callee)
    # Beats keep it listed past the emulator's 2 s unhealthy-after: checked throughout.
    start = time.monotonic()
    while time.monotonic() - start < 2.5:
        assert _addresses(caller) == {_inbound(callee)}
        assert _call(caller).status_code == 200
    assert "v1" in callee.output()
