"""Faults on the upstream side, with real processes: an upstream killed mid-stream, an
upstream that hangs, a peer sidecar restarted under load, a burst of GOAWAYs, the
local app down, a caller that disconnects mid-call. Each test states its promise; after
each, fds and pooled connections return to their baseline (tests/faults/settle.py).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from tests.faults.settle import Baseline, assert_settles
from tests.integration.conftest import Mesh, Sidecar

pytestmark = pytest.mark.integration

# The budget is raised so that this test is about retrying, not about the budget
# (tests/integration/test_resilience_mesh.py covers the budget).
RETRY = {
    "name": "retry",
    "config": {"retry_delay": 0.01, "max_delay": 0.05, "min_retry_concurrency": 100},
}


def outbound(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"filters": {"outbound": list(filters)}}


def warm(caller: Sidecar, service: str, calls: int = 10) -> None:
    with httpx.Client(timeout=10) as client:
        for i in range(calls):
            assert client.get(f"{caller.outbound}/v1/invoke/{service}/warm/{i}").status_code == 200


def serving(sidecars: list[Sidecar], response: httpx.Response) -> Sidecar:
    upstream = response.headers["x-opus-upstream"]
    return next(s for s in sidecars if upstream.endswith(f":{s.ports['inbound']}"))


def load(
    url: str, workers: int, per_worker: int, during: Any = None, method: str = "POST"
) -> list[int | str]:
    """`workers` concurrent clients each making `per_worker` calls; `during(i)` runs in
    worker 0 before its call i (to inject the fault mid-load). Bounded in count; each call
    bounded in time."""

    async def run() -> list[int | str]:
        results: list[int | str] = []
        limits = httpx.Limits(max_connections=workers)
        async with httpx.AsyncClient(timeout=20, limits=limits) as client:

            async def worker(n: int) -> None:
                for i in range(per_worker):
                    if n == 0 and during is not None:
                        await asyncio.to_thread(during, i)
                    try:
                        r = await client.request(method, f"{url}/w{n}/{i}", content=b"x" * 64)
                        results.append(r.status_code)
                    except httpx.HTTPError as exc:
                        results.append(type(exc).__name__)

            await asyncio.gather(*(worker(n) for n in range(workers)))
        return results

    return asyncio.run(run())


def tally(results: list[int | str]) -> dict[int | str, int]:
    return {r: results.count(r) for r in set(results)}


def test_upstream_killed_mid_stream_gives_a_clean_error_and_gets_are_retried(mesh: Mesh) -> None:
    """Promised: a reply cut off mid-body reaches the caller as a broken reply (an error,
    never a short body passed off as whole); idempotent calls in flight on the killed
    peer (no reply head yet) are retried on another one and succeed."""
    inventories = [mesh.service("inventory")[1] for _ in range(3)]
    _, payment = mesh.service("payment", outbound(RETRY))
    mesh.wait_endpoints(payment, "inventory", 3)
    warm(payment, "inventory")
    base = Baseline.take(payment)

    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{payment.outbound}/v1/invoke/inventory/data?n=200000000") as resp,
    ):
        assert resp.status_code == 200
        victim = serving(inventories, resp)
        chunks = resp.iter_bytes()
        next(chunks)
        victim.signal(signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
    survivors = [s for s in inventories if s is not victim]

    # GETs in flight (slow replies) while a second peer is killed: all retried elsewhere.
    def kill_mid_load(i: int) -> None:
        if i == 2:
            survivors[0].signal(signal.SIGKILL)

    results = load(
        f"{payment.outbound}/v1/invoke/inventory/slow?ms=200&x=", 12, 5, kill_mid_load, "GET"
    )
    assert results == [200] * 60, tally(results)
    assert_settles(base)


def test_upstream_that_hangs_times_out_and_does_not_poison_the_pool(mesh: Mesh) -> None:
    """Promised: with the timeout filter at 0.3 s a hung upstream is answered 504 in about
    0.3 s; later calls on the same pool succeed; no connection is left behind."""
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment", outbound({"name": "timeout", "config": {"timeout": 0.3}}))
    warm(payment, "inventory")
    base, peer = Baseline.take(payment), Baseline.take(inventory)
    with httpx.Client(timeout=10) as client:
        for _ in range(10):
            start = time.monotonic()
            resp = client.get(f"{payment.outbound}/v1/invoke/inventory/slow?ms=5000")
            assert resp.status_code == 504
            assert time.monotonic() - start < 1.5
        for i in range(20):
            assert (
                client.get(f"{payment.outbound}/v1/invoke/inventory/after/{i}").status_code == 200
            )
    assert payment.metric("opus_upstream_connections_opened_total", service="inventory") == 1
    assert_settles(base, peer)


def test_peer_sidecar_restarted_under_load_loses_no_unsent_call(mesh: Mesh) -> None:
    """A peer sidecar SIGKILLed and started again while 8 clients POST. Promised: only
    calls the dead peer had already received may fail (at most one per client), calls
    not yet sent are routed elsewhere, and the restarted peer is used again."""
    _, stable = mesh.service("inventory")
    app, restarted = mesh.service("inventory")
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 2)
    warm(payment, "inventory")
    base = Baseline.take(payment)
    replacement: list[Sidecar] = []

    def restart(i: int) -> None:
        if i == 8:
            restarted.signal(signal.SIGKILL)
            restarted.wait()
            replacement.append(mesh.sidecar("inventory", app.ports["port"]))

    results = load(f"{payment.outbound}/v1/invoke/inventory", 8, 25, restart)
    failed = [r for r in results if r != 200]
    assert len(results) == 200
    assert len(failed) <= 8, tally(results)
    mesh.wait_endpoints(payment, "inventory", 2, timeout=10)
    new = replacement[0]
    deadline = time.monotonic() + 10
    with httpx.Client(timeout=10) as client:
        while new.metric("opus_requests_total", direction="inbound") == 0:
            assert time.monotonic() < deadline, "the restarted peer never got a call"
            assert client.get(f"{payment.outbound}/v1/invoke/inventory/again").status_code == 200
    assert stable.proc.poll() is None
    assert_settles(base)


def test_burst_of_goaways_loses_no_call(mesh: Mesh) -> None:
    """Three of four peers drained one after another (SIGTERM: GOAWAY, finish, exit)
    while 10 clients POST. Promised: every call succeeds."""
    peers = [mesh.service("inventory")[1] for _ in range(4)]
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 4)
    warm(payment, "inventory")
    base = Baseline.take(payment)

    def drain(i: int) -> None:
        if i in (3, 9, 15):
            peer = peers[(i - 3) // 6]
            peer.signal(signal.SIGTERM)
            assert peer.wait() == 0

    results = load(f"{payment.outbound}/v1/invoke/inventory", 10, 24, drain)
    assert results == [200] * 240, tally(results)
    assert_settles(base)


def test_local_app_down_fails_fast_and_stays_registered(mesh: Mesh) -> None:
    """The app behind a sidecar dies (file registry: nothing health-checks it).
    Promised: the inbound answers 503 (UF) at once, the instance stays registered, and
    callers get a fast 503, not a hang."""
    app, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    warm(payment, "inventory")
    base = Baseline.take(payment)
    app.proc.kill()
    app.proc.wait()
    with httpx.Client(timeout=10) as client:
        for url in (f"{inventory.inbound}/x", f"{payment.outbound}/v1/invoke/inventory/x"):
            for _ in range(5):
                start = time.monotonic()
                resp = client.get(url)
                assert resp.status_code == 503
                assert resp.headers["x-opus-error"] in ("UF", "UH", "UO", "CO")
                assert time.monotonic() - start < 1.0
        clusters = client.get(f"{payment.admin}/clusters").json()
    endpoints = clusters["outbound"]["inventory"]["endpoints"]
    assert [e["address"] for e in endpoints] == [f"127.0.0.1:{inventory.ports['inbound']}"]
    assert_settles(base)


def test_client_disconnecting_mid_call_resets_upstream_and_leaks_nothing(mesh: Mesh) -> None:
    """20 callers each start a 3 s call and hang up after 0.2 s. Promised: each call is
    cancelled down to the app (the inbound logs DC), and fds and connections return to
    their baseline on both sidecars."""
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    warm(payment, "inventory")
    bases = [Baseline.take(payment), Baseline.take(inventory)]
    port = payment.ports["outbound"]
    request = b"GET /v1/invoke/inventory/slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n"
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request)
        socks.append(sock)
    threading.Event().wait(0.2)  # the calls are in flight upstream by now
    for sock in socks:
        sock.close()
    records = inventory.access_log(count=30, timeout=2.5)  # well before the 3 s replies
    flags = [r["flags"] for r in records if r["path"].startswith("/slow")]
    assert flags.count("DC") == 20, flags
    assert_settles(*bases)
