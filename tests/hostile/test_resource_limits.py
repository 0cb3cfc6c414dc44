"""Resource attacks on a real sidecar's inbound listener (limits.*), with a bystander.

The mesh: an app `inventory` behind sidecar A (attacked on its inbound port) and a
caller sidecar B whose outbound calls inventory through A, over B's pooled HTTP/2
connection (warmed before the attack). Promised: idle sockets, partial HTTP/2
prefaces, stalled bodies and idle keep-alives are closed by their timeouts; beyond
limits.max_connections and at the fd budget (RLIMIT_NOFILE less limits.fd_reserve)
new connections are closed at once, while A's /health, /ready, registry heartbeat and
pooled connections keep working, so the bystander's calls are still served.
"""

from __future__ import annotations

import contextlib
import select
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.hostile.h2raw import PREFACE
from tests.integration.conftest import Mesh, Sidecar

pytestmark = pytest.mark.integration

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


def bystander(caller: Sidecar, calls: int = 50) -> tuple[int, int, float]:
    """`calls` mesh calls through the caller's outbound: (served, failed, p50 ms)."""
    served = failed = 0
    times: list[float] = []
    with httpx.Client(timeout=5) as client:
        for i in range(calls):
            start = time.monotonic()
            try:
                ok = client.get(f"{caller.outbound}/v1/invoke/inventory/b{i}").status_code == 200
            except httpx.HTTPError:
                ok = False
            times.append(time.monotonic() - start)
            served, failed = served + ok, failed + (not ok)
    return served, failed, statistics.median(times) * 1000


def open_sockets(port: int, count: int, first: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first:
            sock.sendall(first)
        socks.append(sock)
    return socks


def closed_within(socks: list[socket.socket], timeout: float) -> list[float]:
    """Seconds until each socket saw EOF or a reset (reading whatever came first)."""
    start = time.monotonic()
    pending = {s.fileno(): s for s in socks}
    closed: list[float] = []
    while pending and time.monotonic() - start < timeout:
        readable, _, _ = select.select(list(pending.values()), [], [], 0.1)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                closed.append(time.monotonic() - start)
                del pending[sock.fileno()]
    return closed


@pytest.fixture
def pair(mesh: Mesh) -> Iterator[tuple[Sidecar, Sidecar]]:
    """(A, B) with small timeouts on A; B's pool to A warmed by one call."""
    limits = {
        "preface_timeout": 1.0,
        "header_read_timeout": 1.0,
        "body_read_timeout": 1.0,
        "idle_timeout": 1.0,
    }
    _, attacked = mesh.service("inventory", {"limits": limits})
    caller = mesh.sidecar("caller", 1)  # its app is never called
    mesh.wait_endpoints(caller, "inventory", 1)
    yield attacked, caller


def test_idle_preface_body_and_keep_alive_attacks_are_closed_by_their_timeouts(
    pair: tuple[Sidecar, Sidecar],
) -> None:
    attacked, caller = pair
    port = attacked.ports["inbound"]
    idle = open_sockets(port, 50)
    prefaces = open_sockets(port, 50, PREFACE[:12])
    bodies = open_sockets(
        port, 50, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc"
    )
    keep_alive = open_sockets(port, 50, GET)
    for sock in keep_alive:  # each is answered, then sits idle
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    served, failed, _ = bystander(caller, 20)
    assert (served, failed) == (20, 0)
    for name, socks in (("idle", idle), ("preface", prefaces), ("body", bodies)):
        closed = closed_within(socks, 5.0)
        assert len(closed) == 50, f"{name}: {50 - len(closed)} of 50 still open after 5 s"
    closed = closed_within(keep_alive, 5.0)
    assert len(closed) == 50, f"keep-alive: {50 - len(closed)} of 50 still open"
    assert attacked.metric("opus_downstream_timeouts_total", timeout="preface") >= 100
    assert attacked.metric("opus_downstream_timeouts_total", timeout="body") >= 50
    assert attacked.metric("opus_downstream_timeouts_total", timeout="idle") >= 50
    for sock in idle + prefaces + bodies + keep_alive:
        sock.close()


@contextlib.contextmanager
def fd_limit(workdir: Path, nofile: int) -> Iterator[None]:
    """Mesh.sidecar starts `sys.executable`: make it a wrapper under `prlimit`."""
    wrapper = workdir / "python-limited"
    wrapper.write_text(f'#!/bin/sh\nexec prlimit --nofile={nofile} -- {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    real = sys.executable
    sys.executable = str(wrapper)
    try:
        yield
    finally:
        sys.executable = real


def test_at_the_fd_limit_new_connections_are_shed_and_the_sidecar_keeps_working(
    mesh: Mesh,
) -> None:
    """420 idle sockets against a sidecar limited to 400 fds: accepts stop at the fd
    budget; /health, /ready, the heartbeat (its record stays listed) and the caller's
    pooled connection keep working."""
    app = mesh.app("inventory")
    with fd_limit(mesh.workdir, 400):
        attacked = mesh.sidecar("inventory", app.ports["port"], {"limits": {"preface_timeout": 60}})
    caller = mesh.sidecar("caller", 1)
    mesh.wait_endpoints(caller, "inventory", 1)
    socks = open_sockets(attacked.ports["inbound"], 420)
    try:
        time.sleep(1.5)  # past the registry's ttl (1 s): a missed heartbeat would show
        served, failed, _ = bystander(caller, 50)
        assert (served, failed) == (50, 0)
        assert httpx.get(f"{attacked.admin}/health", timeout=5).status_code == 200
        assert httpx.get(f"{attacked.admin}/ready", timeout=5).status_code == 200
        clusters = httpx.get(f"{caller.admin}/clusters", timeout=5).json()
        assert len(clusters["outbound"]["inventory"]["endpoints"]) == 1
        assert attacked.metric("opus_downstream_connections_refused_total", limit="fd_reserve") > 0
        assert attacked.proc.poll() is None
    finally:
        for sock in socks:
            sock.close()


def test_connections_beyond_max_connections_are_closed_at_once(mesh: Mesh) -> None:
    """The attacker's connections past the limit are closed at once; the caller's pooled
    connection (opened before) is served. A caller that needs a NEW connection while the
    attacker holds the limit is refused too: the limit protects the process, not a
    caller, until the attacker's connections time out."""
    _, attacked = mesh.service(
        "inventory", {"limits": {"max_connections": 50, "preface_timeout": 60}}
    )
    caller = mesh.sidecar("caller", 1)
    mesh.wait_endpoints(caller, "inventory", 1)  # the caller's pooled connection: 1 of 50
    socks = open_sockets(attacked.ports["inbound"], 60)
    try:
        refused = closed_within(socks, 2.0)
        assert len(refused) == 11  # 49 admitted beside the caller's connection
        served, failed, _ = bystander(caller, 50)
        assert (served, failed) == (50, 0)
        assert (
            attacked.metric("opus_downstream_connections_refused_total", limit="max_connections")
            == 11
        )
        fresh = socket.create_connection(("127.0.0.1", attacked.ports["inbound"]), timeout=5)
        assert closed_within([fresh], 2.0), "a new connection past the limit was admitted"
        fresh.close()
    finally:
        for sock in socks:
            sock.close()
