"""`opus-sidecar stat`'s tables from two /stats snapshots (sidecar/stat.py): the per
service rows, the inbound callers by mTLS identity and each route rule's split."""

from __future__ import annotations

from typing import Any

from sidecar.stat import render_all, shares


def _sample(value: float, **labels: str) -> dict[str, Any]:
    return {"labels": labels, "value": value}


def _snapshot(scale: float) -> dict[str, list[dict[str, Any]]]:
    return {
        "opus_requests_total": [
            _sample(100 * scale, direction="outbound", service="inventory", code="200"),
        ],
        "opus_tls_peer_requests_total": [
            _sample(30 * scale, identity="spiffe://mesh.local/svc/payment"),
            _sample(10 * scale, identity="none"),
        ],
        "opus_route_requests_total": [
            _sample(90 * scale, route="canary", service="inventory", subset="v1"),
            _sample(10 * scale, route="canary", service="inventory", subset="v2"),
            _sample(5 * scale, route="pinned", service="billing", subset=""),
        ],
    }


def test_route_splits_are_shares_of_each_route_over_the_interval() -> None:
    before, after = _snapshot(1), _snapshot(3)  # 2x each count in 2 s
    routes = shares(
        before, after, 2.0, "opus_route_requests_total", ("route", "service", "subset"), 1
    )
    split = {s.labels: (s.rps, s.share, s.total) for s in routes}
    assert split[("canary", "inventory", "v1")] == (90.0, 0.9, 270)
    assert split[("canary", "inventory", "v2")] == (10.0, 0.1, 30)
    assert split[("pinned", "billing", "")] == (5.0, 1.0, 15)


def test_a_series_new_in_the_interval_counts_whole_and_an_idle_one_has_no_share() -> None:
    before = {"opus_route_requests_total": [_sample(7, route="r", service="a", subset="")]}
    after = {
        "opus_route_requests_total": [
            _sample(7, route="r", service="a", subset=""),
            _sample(4, route="s", service="b", subset="v2"),
        ]
    }
    routes = shares(
        before, after, 1.0, "opus_route_requests_total", ("route", "service", "subset"), 1
    )
    assert [(s.labels[0], s.share) for s in routes] == [("r", None), ("s", 1.0)]


def test_render_shows_callers_and_routes_below_the_services() -> None:
    text = render_all(_snapshot(1), _snapshot(2), "http://127.0.0.1:9090", 1.0)
    lines = text.splitlines()
    assert lines[1].split()[:2] == ["DIRECTION", "SERVICE"]
    callers = lines.index(next(line for line in lines if line.startswith("CALLER (mTLS)")))
    assert lines[callers + 2].split() == ["spiffe://mesh.local/svc/payment", "30.0", "75.0%", "60"]
    assert lines[callers + 1].split() == ["none", "10.0", "25.0%", "20"]
    route_rows = [line.split() for line in lines if line.startswith("canary")]
    assert route_rows == [
        ["canary", "inventory", "v1", "90.0", "90.0%", "180"],
        ["canary", "inventory", "v2", "10.0", "10.0%", "20"],
    ]


def test_no_tls_and_no_rules_show_the_services_table_alone() -> None:
    snapshot = {"opus_requests_total": _snapshot(1)["opus_requests_total"]}
    text = render_all(snapshot, snapshot, "admin", 1.0)
    assert "CALLER" not in text and "ROUTE" not in text
