"""`workers: 2`: two processes share the data ports (SO_REUSEPORT) under a supervisor
whose admin port sums their metrics; SIGTERM drains both and exits 0."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from sidecar.metrics import WORKER_FOLD_SECONDS
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
    # The supervisor's /metrics is the sum over the workers' files. A worker folds its
    # per-call counts into its file on a timer (WORKER_FOLD_SECONDS after they start
    # pending), not on each call, so the sum is polled for, within a bound. It is read
    # before any worker's own /stats, which would fold that worker's counts on the spot.
    deadline = time.monotonic() + 5 + WORKER_FOLD_SECONDS
    totals: tuple[float, float] = (0.0, 0.0)
    while time.monotonic() < deadline:
        totals = (
            payment.metric(
                "opus_requests_total", direction="outbound", service="inventory", code="200"
            ),
            payment.metric("opus_upstream_streams_total", service="inventory"),
        )
        if totals == (calls, calls):
            break
        time.sleep(0.05)
    assert totals == (calls, calls)
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
    assert (
        payment.metric("opus_upstream_connections", service="inventory") >= 2
    )  # one pool per worker
    payment.signal(signal.SIGTERM)
    assert payment.wait() == 0
