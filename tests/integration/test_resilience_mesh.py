"""The resilience filters between real sidecars: retries, the retry budget, deadlines,
rate limiting and the circuit breaker, over real HTTP/2 hops to real apps."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Mesh, Sidecar, refusing_port

pytestmark = pytest.mark.integration


def outbound_filters(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"filters": {"outbound": list(filters)}}


def broken_inventory(mesh: Mesh) -> Sidecar:
    """An inventory instance whose app is gone: its inbound sidecar answers 503 (UF)."""
    return mesh.sidecar("inventory", refusing_port())


def access_lines(sidecar: Sidecar, workdir: Path) -> list[dict[str, Any]]:
    path = workdir / f"{sidecar.name}.access.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def refusing_inventory(mesh: Mesh) -> Sidecar:
    """An inventory instance that answers every call 503 from its own open circuit.

    Its app is gone and its inbound chain has a breaker that one failure opens for
    minutes; one direct call opens it. From then on its 503s carry x-opus-error CO,
    which the caller's cluster does not resend by itself (only UF/UH/UO/UR say the
    app never saw a call), so recovering them is the retry filter's work.
    """
    breaker = {"consecutive_failures": 1, "open_duration": 300.0}
    sidecar = mesh.sidecar(
        "inventory",
        refusing_port(),
        {"filters": {"inbound": [{"name": "circuit_breaker", "config": breaker}]}},
    )
    assert httpx.get(f"{sidecar.inbound}/trip", timeout=10).status_code == 503
    resp = httpx.get(f"{sidecar.inbound}/check", timeout=10)
    assert resp.status_code == 503 and resp.headers["x-opus-circuit"] == "open"
    return sidecar


def test_retries_recover_calls_when_one_of_two_endpoints_fails(mesh: Mesh) -> None:
    mesh.service("inventory")
    broken = refusing_inventory(mesh)
    _, payment = mesh.service(
        "payment", outbound_filters({"name": "retry", "config": {"retry_delay": 0.01}})
    )
    mesh.wait_endpoints(payment, "inventory", 2)
    # wait_endpoints routed calls too: count from here.
    refused_before = broken.metric("opus_requests_total", direction="inbound", code="503")
    retries_before = payment.metric("opus_retries_total", service="inventory")
    statuses = []
    with httpx.Client(timeout=10) as client:
        for i in range(20):
            resp = client.get(f"{payment.outbound}/v1/invoke/inventory/item/{i}")
            statuses.append(resp.status_code)
            assert resp.json()["app"] == "inventory"
            assert resp.headers["x-opus-upstream"] != f"127.0.0.1:{broken.ports['inbound']}"
    assert statuses == [200] * 20
    refused = broken.metric("opus_requests_total", direction="inbound", code="503") - refused_before
    retries = payment.metric("opus_retries_total", service="inventory") - retries_before
    # Every call the broken instance refused was retried once, to the healthy one.
    assert refused >= 1
    assert retries == refused


def test_retry_budget_stops_a_retry_storm_when_every_endpoint_fails(mesh: Mesh) -> None:
    """30 concurrent GETs against two broken instances.

    Without a budget each call would retry 3 times: 90 retries. With the budget, retries
    in flight are at most max(min_retry_concurrency 3, 20% of 30 calls) = 6, and a
    retry holds its slot through its backoff (here at least 1 s), longer than it
    takes all 30 first tries to fail. So at most 6 calls ever start retrying, each
    retries at most 3 times (<= 18 retries), and the other >= 24 calls are answered
    at once with the 503 they got: quicker than the 1 s any retried call sleeps.
    """
    broken_inventory(mesh)
    broken_inventory(mesh)
    config = {
        "retry_delay": 2.0,
        "max_delay": 2.0,
        "budget_percent": 20,
        "min_retry_concurrency": 3,
    }
    _, payment = mesh.service("payment", outbound_filters({"name": "retry", "config": config}))
    mesh.wait_endpoints(payment, "inventory", 2)
    calls = 30

    async def storm() -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=calls)
        async with httpx.AsyncClient(timeout=20, limits=limits) as client:

            async def one(i: int) -> tuple[int, float]:
                start = time.monotonic()
                resp = await client.get(f"{payment.outbound}/v1/invoke/inventory/item/{i}")
                return resp.status_code, time.monotonic() - start

            return list(await asyncio.gather(*(one(i) for i in range(calls))))

    results = asyncio.run(storm())
    assert [status for status, _ in results] == [503] * calls
    retries = payment.metric("opus_retries_total", service="inventory")
    refused = payment.metric("opus_retry_budget_exhausted_total", service="inventory")
    assert retries <= 18, (retries, refused, results)
    assert refused >= calls - 6, (retries, refused, results)
    fast = sum(1 for _, seconds in results if seconds < 1.0)
    assert fast >= calls - 6, results  # refused calls did not wait out a backoff


def test_deadline_propagates_and_cuts_off_a_slow_upstream(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service(
        "payment", outbound_filters({"name": "timeout", "config": {"timeout": 1.0}})
    )
    with httpx.Client(timeout=10) as client:
        echoed = client.get(f"{payment.outbound}/v1/invoke/inventory/echo").json()
        deadline_ms = int(echoed["headers"]["x-opus-deadline-ms"])
        assert 0 < deadline_ms <= 1000

        start = time.monotonic()
        resp = client.get(f"{payment.outbound}/v1/invoke/inventory/slow?ms=3000")
        elapsed = time.monotonic() - start
    assert resp.status_code == 504
    assert resp.headers["x-opus-error"] == "UT"
    assert 0.9 <= elapsed < 2.5
    assert payment.metric("opus_timeouts_total", service="inventory", kind="overall") == 1

    # The deadline reached the inventory sidecar: its inbound call ended at it, either
    # cut off by its own copy of the deadline (UT) or cancelled by payment's reset (DC).
    deadline = time.monotonic() + 5.0
    slow: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not slow:
        slow = [r for r in access_lines(inventory, mesh.workdir) if "/slow" in str(r.get("path"))]
        if not slow:
            time.sleep(0.05)
    assert slow, "no inbound access-log line for the cut-off call"
    assert str(slow[0]["flags"]).split(":")[0] in ("UT", "DC")
    assert slow[0]["status"] in (0, 504)  # never the app's late 200


def test_rate_limiter_answers_429_at_the_configured_rate(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service(
        "payment", outbound_filters({"name": "rate_limit", "config": {"rate": 5, "burst": 5}})
    )
    statuses = []
    retry_after = set()
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        for i in range(20):
            resp = client.get(f"{payment.outbound}/v1/invoke/inventory/item/{i}")
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                retry_after.add(resp.headers["retry-after"])
                assert resp.json()["status"] == 429
        elapsed = time.monotonic() - start
    ok = statuses.count(200)
    # The burst, plus what the bucket refilled at 5/s while the calls ran.
    assert 5 <= ok <= 5 + int(5 * elapsed) + 1
    assert statuses.count(429) == 20 - ok
    assert statuses[:5] == [200] * 5
    assert retry_after == {"1"}  # a token is at most 0.2 s away: rounds up to 1 s
    assert payment.metric("opus_rate_limited_total", service="inventory") == 20 - ok


def test_circuit_breaker_opens_and_stops_calling_the_upstream(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    config = {"consecutive_failures": 3, "open_duration": 30.0}
    _, payment = mesh.service(
        "payment", outbound_filters({"name": "circuit_breaker", "config": config})
    )
    with httpx.Client(timeout=10) as client:
        failures = [
            client.get(f"{payment.outbound}/v1/invoke/inventory/status/500").status_code
            for _ in range(3)
        ]
        assert failures == [500] * 3
        for _ in range(3):
            resp = client.get(f"{payment.outbound}/v1/invoke/inventory/status/200")
            assert resp.status_code == 503
            assert resp.headers["x-opus-circuit"] == "open"
            assert resp.headers["x-opus-error"] == "CO"
    # Only the three failing calls ever reached inventory.
    assert inventory.metric("opus_requests_total", direction="inbound", service="inventory") == 3
    assert (
        payment.metric(
            "opus_circuit_open_total", service="inventory", reason="consecutive_failures"
        )
        == 1
    )
