"""`workers: 2`: two processes share the data ports (SO_REUSEPORT) under a supervisor
whose admin port sums their metrics; SIGTERM drains both and exits 0."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.integration.conftest import Mesh

pytestmark = pytest.mark.integration


def test_two_workers_share_ports_and_metrics_add_up(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {"workers": 2})
    calls = 120
    for _ in range(calls):
        # A new connection per call, so the kernel spreads them over both workers.
        resp = httpx.get(
            f"{payment.outbound}/v1/invoke/inventory/w", headers={"connection": "close"}, timeout=10
        )
        assert resp.status_code == 200
    workers = httpx.get(f"{payment.admin}/clusters", timeout=5).json()["workers"]
    assert len(workers) == 2 and all(w["ready"] for w in workers)
    per_worker = []
    for worker in workers:
        stats = httpx.get(
            f"http://{worker['admin']}/stats", params={"filter": "opus_requests_total"}, timeout=5
        ).json()
        per_worker.append(
            sum(
                s["value"]
                for s in stats.get("opus_requests_total", [])
                if s["labels"]["direction"] == "outbound"
            )
        )
    assert sum(per_worker) == calls and min(per_worker) > 0, per_worker
    # The supervisor's /metrics is the sum over the workers.
    assert (
        payment.metric("opus_requests_total", direction="outbound", service="inventory", code="200")
        == calls
    )
    assert (
        payment.metric("opus_upstream_connections", service="inventory") >= 2
    )  # one pool per worker
    payment.signal(signal.SIGTERM)
    assert payment.wait() == 0
