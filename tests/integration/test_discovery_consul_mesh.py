"""Sidecars discovering each other through Consul, end to end.

Runs against the Consul emulator (tests/emulators/consul_emulator.py, which follows
Consul's documented HTTP API: agent service/check endpoints, health and catalog
blocking queries, TTL checks) started as a real process on 127.0.0.1 port 0; set
CONSUL_HTTP_ADDR to run the same cases against a real Consul agent (the cases that
need the emulator's outage switch or a second datacenter are skipped there).
The outage lasts 3 s by default; OPUS_LONG_TESTS=1 makes it the full 30 s.
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

REAL_CONSUL = os.environ.get("CONSUL_HTTP_ADDR", "")
needs_emulator = pytest.mark.skipif(bool(REAL_CONSUL), reason="needs the emulator's admin routes")
RETRY = {
    "filters": {"outbound": [{"name": "retry", "config": {"max_retries": 2, "retry_delay": 0.01}}]}
}
OUTAGE_S = 30.0 if os.environ.get("OPUS_LONG_TESTS") == "1" else 3.0


def _consul(mesh: Mesh, *dcs: str) -> tuple[str, dict[str, int]]:
    """The Consul address (emulator started unless CONSUL_HTTP_ADDR), and agents by dc."""
    if REAL_CONSUL:
        address = REAL_CONSUL if "//" in REAL_CONSUL else "http://" + REAL_CONSUL
        return address, {}
    argv = [sys.executable, "-m", "tests.emulators.consul_emulator", "--port", "0"]
    for dc in dcs or ("dc1",):
        argv += ["--dc", dc]
    proc = Proc("consul", argv, mesh.workdir, None)
    mesh.procs.append(proc)
    agents: dict[str, int] = proc.ports["agents"]  # type: ignore[assignment]
    return f"http://127.0.0.1:{proc.ports['port']}", agents


def _extra(address: str, **consul: Any) -> dict[str, Any]:
    return {
        "discovery": {"backend": "consul", "consul": {"address": address, "wait": 10.0, **consul}}
    }


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _service(mesh: Mesh, name: str, extra: dict[str, Any]) -> tuple[Proc, Sidecar]:
    app = mesh.app(name)
    return app, mesh.sidecar(name, app.ports["port"], extra)


# One client, kept: a fresh httpx.get() per call costs ~50 ms here, which would hide
# the figures these tests measure.
HTTP = httpx.Client(timeout=5)


@pytest.fixture(autouse=True, scope="module")
def _close_http() -> Iterator[None]:
    yield
    HTTP.close()


def _call(
    caller: Sidecar, path: str = "/x", headers: dict[str, str] | None = None
) -> httpx.Response:
    return HTTP.get(f"{caller.outbound}/v1/invoke/inventory{path}", headers=headers)


def _cluster(caller: Sidecar, service: str = "inventory") -> list[dict[str, Any]]:
    clusters = HTTP.get(f"{caller.admin}/clusters").json()
    endpoints: list[dict[str, Any]] = (
        clusters.get("outbound", {}).get(service, {}).get("endpoints", [])
    )
    return endpoints


def _addresses(caller: Sidecar) -> set[str]:
    return {e["address"] for e in _cluster(caller)}


def _inbound(sidecar: Sidecar) -> str:
    return f"127.0.0.1:{sidecar.ports['inbound']}"


def test_new_instance_routed_within_1s_killed_one_out_within_1s_shutdown_deregisters(
    mesh: Mesh,
) -> None:
    address, _ = _consul(mesh)
    extra = _extra(address)
    _, first = _service(mesh, "inventory", extra)
    # The retry filter covers a call written to a pooled connection to the app just as it
    # dies (the peer answers 502, the app may have seen it); the rest the router resends.
    _, caller = _service(mesh, "payment", _merge(extra, RETRY))
    mesh.wait_endpoints(caller, "inventory", 1)

    # A new instance: time from its sidecar being ready (registered) to a call reaching it.
    app2, second = _service(mesh, "inventory", extra)
    ready_at = time.monotonic()
    deadline = ready_at + 5.0
    while time.monotonic() < deadline:
        if _call(caller).headers.get("x-opus-upstream") == _inbound(second):
            break
    routed_after = time.monotonic() - ready_at
    print(f"\nnew instance first routed to {routed_after * 1000:.0f} ms after it was ready")
    assert routed_after < 1.0

    # Steady load, one call at a time (none in flight at the kill); SIGKILL the app.
    failures: list[int] = []
    upstreams: list[tuple[float, str]] = []
    killed_at = gone_at = 0.0
    start = time.monotonic()
    for i in range(5000):
        now = time.monotonic()
        if now - start > 8.0 or (gone_at and now - gone_at > 0.5):
            break
        if i == 50:
            app2.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        resp = _call(caller)
        if resp.status_code != 200:
            failures.append(resp.status_code)
        upstreams.append((time.monotonic(), resp.headers.get("x-opus-upstream", "")))
        if killed_at and not gone_at and _inbound(second) not in _addresses(caller):
            gone_at = time.monotonic()
    assert killed_at and gone_at, "the killed instance never left the caller's cluster"
    last_routed = max((t for t, up in upstreams if up == _inbound(second)), default=killed_at)
    print(
        f"killed app: last call answered by it {max(0.0, last_routed - killed_at) * 1000:.0f} ms "
        f"after the kill; gone from the caller's /clusters after {(gone_at - killed_at) * 1000:.0f} ms; "
        f"{len(upstreams)} calls, {len(failures)} failed"
    )
    assert failures == []
    assert last_routed - killed_at < 1.0
    assert gone_at - killed_at < 1.5  # check_interval (1 s) + the blocking query's return

    # Shutdown deregisters: SIGTERM the first instance's sidecar.
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    entries = HTTP.get(f"{address}/v1/health/service/inventory").json()
    assert "sidecar-inventory-1" not in {e["Service"]["ID"] for e in entries}
    deadline = time.monotonic() + 2.0
    while _inbound(first) in _addresses(caller) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _inbound(first) not in _addresses(caller)


@needs_emulator
def test_consul_down_calls_keep_flowing_on_last_known_endpoints(mesh: Mesh) -> None:
    address, _ = _consul(mesh)
    extra = _extra(address, retry_max=0.5)
    _service(mesh, "inventory", extra)
    _, caller = _service(mesh, "payment", extra)
    mesh.wait_endpoints(caller, "inventory", 1)
    assert (
        HTTP.put(f"{address}/_emulator/outage", json={"down": True}, timeout=5).status_code == 200
    )
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < OUTAGE_S and calls < 100_000:
        assert _call(caller).status_code == 200
        calls += 1
    assert caller.metric("opus_discovery_stale", backend="consul") == 1
    assert caller.metric("opus_discovery_errors_total", backend="consul") >= 1
    assert (
        HTTP.put(f"{address}/_emulator/outage", json={"down": False}, timeout=5).status_code == 200
    )
    deadline = time.monotonic() + 5.0
    while (
        caller.metric("opus_discovery_stale", backend="consul") != 0 and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert caller.metric("opus_discovery_stale", backend="consul") == 0
    # Recovered for real: an instance registered after the outage is routed to.
    _, late = _service(mesh, "inventory", extra)
    mesh.wait_endpoints(caller, "inventory", 2)
    assert _inbound(late) in _addresses(caller)
    print(f"\n{calls} calls succeeded during a {OUTAGE_S:.0f} s Consul outage")


@needs_emulator
def test_datacenter_failover_and_back(mesh: Mesh) -> None:
    address, agents = _consul(mesh, "dc1", "dc2")
    dc2 = f"http://127.0.0.1:{agents['dc2']}"
    _, remote = _service(mesh, "inventory", _extra(dc2))
    _, caller = _service(mesh, "payment", _extra(address, failover_datacenters=["dc2"]))
    resp = _call(caller)
    assert resp.status_code == 200 and resp.headers["x-opus-upstream"] == _inbound(remote)
    _, local = _service(mesh, "inventory", _extra(address))
    deadline = time.monotonic() + 2.0
    while _addresses(caller) != {_inbound(local)} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _call(caller).headers["x-opus-upstream"] == _inbound(local)


def test_outlier_ejection_and_return(mesh: Mesh) -> None:
    address, _ = _consul(mesh)
    extra = _extra(address)
    _service(mesh, "inventory", extra)
    _service(mesh, "inventory", extra)
    outlier = {"consecutive_5xx": 3, "base_ejection_time": 1.0}
    _, caller = _service(mesh, "payment", _merge(extra, {"upstream": {"outlier": outlier}}))
    mesh.wait_endpoints(caller, "inventory", 2)
    for _ in range(6):
        assert _call(caller, "/status/500").status_code == 500
    health = [e["health"] for e in _cluster(caller)]
    assert sorted(health) == ["ejected", "healthy"]  # never more than 50%
    assert caller.metric("opus_endpoint_ejections_total", service="inventory") == 1
    ejected_at = time.monotonic()
    while (
        "ejected" in [e["health"] for e in _cluster(caller)] and time.monotonic() - ejected_at < 5
    ):
        _call(caller)  # picks check the return time
        time.sleep(0.05)
    assert [e["health"] for e in _cluster(caller)] == ["healthy", "healthy"]
    assert time.monotonic() - ejected_at >= 0.5


def test_ring_hash_keeps_a_key_on_one_endpoint(mesh: Mesh) -> None:
    address, _ = _consul(mesh)
    extra = _extra(address)
    for _ in range(3):
        _service(mesh, "inventory", extra)
    ring = {"upstream": {"lb_policy": "ring_hash", "hash_header": "x-user-id"}}
    _, caller = _service(mesh, "payment", _merge(extra, ring))
    mesh.wait_endpoints(caller, "inventory", 3)
    for user in ("alice", "bob", "carol"):
        seen = {
            _call(caller, headers={"x-user-id": user}).headers["x-opus-upstream"] for _ in range(10)
        }
        assert len(seen) == 1
    spread = {
        _call(caller, headers={"x-user-id": f"u{i}"}).headers["x-opus-upstream"] for i in range(30)
    }
    assert len(spread) > 1
    without_key = {_call(caller).headers["x-opus-upstream"] for _ in range(6)}
    assert len(without_key) == 3  # round robin


def test_killed_sidecar_out_of_rotation_at_once(mesh: Mesh) -> None:
    """SIGKILL a peer sidecar: its TTL check lapses only after `ttl` (3 s), but callers
    stop using it at once (connect failures resend and eject it). A call written to the
    pooled connection just before the kernel resets it may have been seen, as far as
    the caller can tell: the retry filter resends it (a GET is idempotent)."""
    address, _ = _consul(mesh)
    extra = _extra(address)
    _service(mesh, "inventory", extra)
    _, victim = _service(mesh, "inventory", extra)
    retry = {
        "filters": {
            "outbound": [{"name": "retry", "config": {"max_retries": 2, "retry_delay": 0.01}}]
        }
    }
    _, caller = _service(mesh, "payment", _merge(extra, retry))
    mesh.wait_endpoints(caller, "inventory", 2)
    failures: list[int] = []
    killed_at = last_routed = out_at = 0.0
    start = time.monotonic()
    for i in range(5000):
        if time.monotonic() - start > 6.0 or (out_at and time.monotonic() - out_at > 0.5):
            break
        if i == 20:
            victim.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        resp = _call(caller)
        if resp.status_code != 200:
            failures.append(resp.status_code)
        if resp.headers.get("x-opus-upstream") == _inbound(victim):
            last_routed = time.monotonic()
        if killed_at and not out_at:
            state = {e["address"]: e["health"] for e in _cluster(caller)}
            if state.get(_inbound(victim), "gone") != "healthy":
                out_at = time.monotonic()
    assert killed_at and out_at
    print(
        f"\nkilled sidecar: last call answered by it {max(0.0, last_routed - killed_at) * 1000:.0f} ms "
        f"after the kill; ejected or gone at the caller after {(out_at - killed_at) * 1000:.0f} ms; "
        f"{len(failures)} failed"
    )
    assert failures == []
    assert out_at - killed_at < 1.0
    assert caller.metric("opus_endpoint_ejections_total", service="inventory") == 1
