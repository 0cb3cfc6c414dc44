"""What an operator sees: metrics that move with calls, access-log lines with a flag for
each failure kind, the admin endpoints, and `opus-sidecar stat` on a live sidecar."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Mesh, refusing_port

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for lbl, v in samples.get(name, []) if all(lbl.get(k) == x for k, x in labels.items())
    )


def test_metrics_move_as_calls_happen(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    before = _samples(payment.metrics())
    with httpx.Client(timeout=10) as client:
        for _ in range(7):
            assert (
                client.post(
                    f"{payment.outbound}/v1/invoke/inventory/r", content=b"x" * 300
                ).status_code
                == 200
            )
        assert client.get(f"{payment.outbound}/v1/invoke/inventory/status/404").status_code == 404
    after = _samples(payment.metrics())
    labels = {"direction": "outbound", "service": "inventory"}
    assert (
        _value(after, "opus_requests_total", code="200", **labels)
        - _value(before, "opus_requests_total", code="200", **labels)
        == 7
    )
    assert _value(after, "opus_requests_total", code="404", **labels) == 1
    assert _value(after, "opus_request_duration_seconds_count", **labels) == 8
    assert _value(after, "opus_request_size_bytes_sum", **labels) == 7 * 300
    assert _value(after, "opus_response_size_bytes_count", **labels) == 8
    assert _value(after, "opus_upstream_connections_opened_total", service="inventory") == 1
    assert _value(after, "opus_upstream_streams_total", service="inventory") == 8
    assert _value(after, "opus_endpoints", service="inventory") == 1
    assert _value(after, "process_resident_memory_bytes") > 0
    # Sub-millisecond buckets exist for a hop that costs ~0.1 ms.
    les = {lbl["le"] for lbl, _ in after["opus_request_duration_seconds_bucket"]}
    assert "0.0001" in les and "10.0" in les


def test_access_log_flags_name_each_failure(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    # "ghost" has a registered endpoint that refuses connections: connect failure.
    _, payment = mesh.service(
        "payment",
        {
            "discovery": {"backend": "static", "static": {"services": {
                "inventory": [f"127.0.0.1:{inventory.ports['inbound']}"],
                "ghost": [f"127.0.0.1:{refusing_port()}"],
                "empty": [],
            }}},
        },
    )  # fmt: skip
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{payment.outbound}/v1/invoke/nosuch/x").status_code == 503  # NR
        assert client.get(f"{payment.outbound}/v1/invoke/empty/x").status_code == 503  # UH
        assert client.get(f"{payment.outbound}/v1/invoke/ghost/x").status_code == 503  # UF
        slow = client.get(
            f"{payment.outbound}/v1/invoke/inventory/slow?ms=3000",
            headers={"x-opus-deadline-ms": "300"},
        )
        assert slow.status_code == 504  # UT
        with pytest.raises(httpx.ReadTimeout):  # DC: the caller gives up
            client.get(f"{payment.outbound}/v1/invoke/inventory/slow?ms=3000", timeout=0.3)
        assert client.get(f"{payment.outbound}/v1/invoke/inventory/ok").status_code == 200
    lines = payment.access_log(6)
    flags = [line["flags"] for line in lines]
    assert flags == ["NR", "UH", "UF", "UT", "DC", "-"], flags
    ok = lines[-1]
    assert ok["status"] == 200 and ok["upstream"] == f"127.0.0.1:{inventory.ports['inbound']}"
    assert ok["route"] == "invoke" and ok["tries"] == 1 and ok["service"] == "inventory"
    for key in (
        "time",
        "trace_id",
        "direction",
        "method",
        "path",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "grpc_status",
    ):
        assert key in ok


def test_admin_endpoints(mesh: Mesh) -> None:
    _, payment = mesh.service("payment", {"service": {"meta": {"team": "pay"}}})
    admin = payment.admin
    dump = httpx.get(f"{admin}/config_dump", timeout=5).json()
    assert dump["service"]["name"] == "payment" and dump["upstream"]["max_per_route"] == 5
    stats = httpx.get(f"{admin}/stats", params={"filter": "opus_endpoints"}, timeout=5).json()
    assert all(name.startswith("opus_endpoints") for name in stats)
    assert httpx.post(f"{admin}/logging", params={"level": "debug"}, timeout=5).json() == {
        "level": "DEBUG"
    }
    assert httpx.post(f"{admin}/logging", params={"level": "loud"}, timeout=5).status_code == 400
    assert httpx.get(f"{admin}/health", timeout=5).content == b'{"status":"UP"}'
    # /drain: out of rotation but still running; /quitquitquit: exits cleanly.
    assert httpx.post(f"{admin}/drain", timeout=5).status_code == 200
    assert httpx.get(f"{admin}/ready", timeout=5).status_code == 503
    assert payment.proc.poll() is None
    assert httpx.post(f"{admin}/quitquitquit", timeout=5).status_code == 200
    assert payment.wait() == 0


def test_stat_renders_against_a_live_sidecar(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    stat = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "stat",
            "--admin",
            payment.admin,
            "--interval",
            "1.5",
            "--once",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    made = 0
    with httpx.Client(timeout=10) as client:
        # Traffic across stat's sampling window: 1 call in 10 fails.
        while stat.poll() is None and made < 2000:
            path = "status/503" if made % 10 == 9 else "x"
            client.get(f"{payment.outbound}/v1/invoke/inventory/{path}")
            made += 1
    out, err = stat.communicate(timeout=20)
    assert stat.returncode == 0, err
    text = out.decode()
    header, row = text.splitlines()[1:3]
    assert header.split() == [
        "DIRECTION",
        "SERVICE",
        "RPS",
        "SUCCESS",
        "P50",
        "P95",
        "P99",
        "TOTAL",
    ]
    cells = row.split()
    assert cells[:2] == ["outbound", "inventory"]
    assert float(cells[2]) > 0
    assert cells[3].endswith("%") and 80.0 <= float(cells[3][:-1]) < 100.0  # one 503 in 10
    assert cells[4].endswith("ms") and 0 < int(cells[7]) <= made
