"""Route rules through real sidecars on a file registry: a weighted split between two
subsets of a service (instances told apart by their registered metadata), 503 naming
an empty subset, the rule's name in the access log, per-route policy, injected faults
over HTTP/1.1, h2c and gRPC, and a mirror that hangs or fails without touching the
real calls."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.conftest import Mesh, Sidecar


def inventory_pair(mesh: Mesh) -> None:
    """Two inventory instances, v1 and v2, each with its sidecar (their `service.meta`
    is what they register)."""
    for version in ("v1", "v2"):
        app = mesh.app(f"inventory-{version}")
        mesh.sidecar("inventory", app.ports["port"], {"service": {"meta": {"version": version}}})


def caller(mesh: Mesh, services: dict[str, Any], extra: dict[str, Any] | None = None) -> Sidecar:
    app = mesh.app("payment")
    config: dict[str, Any] = {"services": services, **(extra or {})}
    return mesh.sidecar("payment", app.ports["port"], config)


CANARY = {
    "inventory": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}, "v3": {"version": "v3"}},
        "route_rules": [
            {
                "name": "nowhere",
                "match": {"headers": [{"name": "x-v3", "present": True}]},
                "destinations": [{"subset": "v3"}],
            },
            {
                "name": "canary",
                "match": {"path": {"prefix": "/echo"}},
                "destinations": [
                    {"subset": "v1", "weight": 90},
                    {"subset": "v2", "weight": 10},
                ],
            },
        ],
    }
}


@pytest.mark.parametrize("upstream", ["h2c", "http1"])  # http1: the callback path
def test_a_90_10_split_between_subsets(mesh: Mesh, upstream: str) -> None:
    inventory_pair(mesh)
    payment = caller(mesh, CANARY, {"upstream": {"protocol": upstream}})
    mesh.wait_endpoints(payment, "inventory", 2)
    apps: dict[str, int] = {}
    with httpx.Client(base_url=payment.outbound, timeout=10) as client:
        for _ in range(400):
            response = client.get("/v1/invoke/inventory/echo")
            assert response.status_code == 200
            apps[response.headers["x-app"]] = apps.get(response.headers["x-app"], 0) + 1
    assert abs(apps.get("inventory-v2", 0) / 4 - 10) <= 1.5, apps
    assert apps["inventory-v1"] + apps["inventory-v2"] == 400
    records = payment.access_log(401)
    assert {r["route"] for r in records[-400:]} == {"canary"}
    assert (
        payment.metric("opus_route_requests_total", route="canary", subset="v2")
        == apps["inventory-v2"]
    )


def test_an_empty_subset_is_a_503_naming_it(mesh: Mesh) -> None:
    inventory_pair(mesh)
    payment = caller(mesh, CANARY)
    mesh.wait_endpoints(payment, "inventory", 2)
    response = httpx.get(
        f"{payment.outbound}/v1/invoke/inventory/echo", headers={"x-v3": "1"}, timeout=10
    )
    assert response.status_code == 503
    assert "subset 'v3' of service 'inventory'" in response.text
    assert response.headers["x-opus-error"] == "UH"


POLICY = {
    "inventory": {
        "route_rules": [
            {
                "name": "slow",
                "match": {"path": {"prefix": "/slow"}},
                "timeout": 0.3,
                "headers": {"request_headers_to_set": {"x-route": "slow"}},
            },
            {
                "name": "retried",
                "match": {"path": {"prefix": "/status/"}},
                "retry": {"attempts": 2, "retriable_status_codes": [503]},
            },
            {
                "name": "tagged",
                "match": {"path": {"prefix": "/echo"}, "methods": ["GET"]},
                "headers": {"request_headers_to_set": {"x-route": "tagged"}},
                "retry": {"attempts": 2, "per_try_timeout": 2.0},
            },
        ]
    }
}


def test_per_route_timeout_and_header_rewrites(mesh: Mesh) -> None:
    mesh.service("inventory")
    payment = caller(mesh, POLICY)
    mesh.wait_endpoints(payment, "inventory", 1)
    with httpx.Client(base_url=payment.outbound, timeout=10) as client:
        echoed = client.get("/v1/invoke/inventory/echo").json()
        assert echoed["headers"]["x-route"] == "tagged"
        posted = client.post("/v1/invoke/inventory/echo", content=b"x").json()
        assert "x-route" not in posted["headers"]  # POST: not the rule's method
        slow = client.get("/v1/invoke/inventory/slow", params={"ms": "3000"})
        assert slow.status_code == 504
        assert slow.headers["x-opus-error"] == "UT"
        retried = client.get("/v1/invoke/inventory/status/503")
        assert retried.status_code == 503
        assert retried.headers["x-opus-attempt-count"] == "3"  # the first try and 2 retries
    routes = [r["route"] for r in payment.access_log(5)[-4:]]
    assert routes == ["tagged", "invoke", "slow", "retried"]


CHAOS = {
    "route_rules": [
        {
            "name": "chaos",
            "match": {"headers": [{"name": "x-chaos", "present": True}]},
            "fault": {"abort": {"http_status": 503, "grpc_status": 8}, "header": "x-chaos"},
        }
    ]
}


def test_aborts_carry_their_status_over_http1_h2c_and_grpc(mesh: Mesh) -> None:
    import grpc

    mesh.service("inventory")
    payment = caller(mesh, {}, CHAOS)
    mesh.wait_endpoints(payment, "inventory", 1)
    url = f"{payment.outbound}/v1/invoke/inventory/echo"
    assert httpx.get(url, timeout=10).status_code == 200  # no header: no fault
    http1 = httpx.get(url, headers={"x-chaos": "1"}, timeout=10)
    assert (http1.status_code, http1.headers["x-opus-error"]) == (503, "FI")
    with httpx.Client(http1=False, http2=True, timeout=10) as client:  # h2c prior knowledge
        h2c = client.get(url, headers={"x-chaos": "1"})
        assert (h2c.http_version, h2c.status_code) == ("HTTP/2", 503)
        assert client.get(url).status_code == 200
    channel = grpc.insecure_channel(
        f"127.0.0.1:{payment.ports['outbound']}", options=[("grpc.default_authority", "inventory")]
    )
    with channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        try:
            unary(b"hi", metadata=[("x-chaos", "1")], timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert exc.details() == "fault injected"
        else:
            raise AssertionError("the fault did not abort the gRPC call")
    assert payment.metric("opus_faults_injected_total", route="chaos", kind="abort") == 3


def test_an_injected_delay_holds_only_the_calls_it_matches(mesh: Mesh) -> None:
    import time

    mesh.service("inventory")
    slow = {
        "route_rules": [
            {
                "name": "lag",
                "match": {"headers": [{"name": "x-lag", "present": True}]},
                "fault": {"delay": {"fixed": 0.3, "percent": 100}},
            }
        ]
    }
    payment = caller(mesh, {}, slow)
    mesh.wait_endpoints(payment, "inventory", 1)
    url = f"{payment.outbound}/v1/invoke/inventory/echo"
    with httpx.Client(timeout=10) as client:
        started = time.perf_counter()
        assert client.get(url, headers={"x-lag": "1"}).status_code == 200
        lagged = time.perf_counter() - started
        started = time.perf_counter()
        assert client.get(url).status_code == 200
        plain = time.perf_counter() - started
    assert lagged >= 0.3 > plain
    flags = [r["flags"] for r in payment.access_log(3)[-2:]]
    assert flags == ["DI", "-"]


class BrokenApp:
    """An app that answers every request 500 (mode "500"), or a listening socket that
    never answers at all (mode "hang": the kernel completes the handshake, nobody reads)."""

    def __init__(self, mode: str) -> None:
        import socket
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen = 0
        self.mode = mode
        if mode == "hang":
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(1024)
            self.port = self.sock.getsockname()[1]
            return
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen += 1
                self.send_response(500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.mode == "hang":
            self.sock.close()
        else:
            self.server.shutdown()
            self.server.server_close()


def mirrored(percent: float) -> dict[str, Any]:
    return {
        "inventory": {
            "route_rules": [
                {
                    "name": "shadowed",
                    "mirror": {
                        "service": "shadow",
                        "percent": percent,
                        "max_in_flight": 4,
                        "timeout": 30.0,
                    },
                }
            ]
        }
    }


def wait_mirror_endpoint(caller: Sidecar, service: str) -> None:
    """One mirrored call makes the mirror's cluster; then until it has its endpoint
    (a call of our own to the mirror would hang with it)."""
    import time

    timed_calls(caller, 1)
    deadline = time.monotonic() + 5
    while True:
        clusters = httpx.get(f"{caller.admin}/clusters", timeout=5).json()
        if clusters.get("outbound", {}).get(service, {}).get("endpoints"):
            return
        assert time.monotonic() < deadline, clusters
        time.sleep(0.02)


def timed_calls(payment: Sidecar, count: int) -> list[float]:
    import time

    took = []
    with httpx.Client(base_url=payment.outbound, timeout=10) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.get("/v1/invoke/inventory/echo")
            took.append(time.perf_counter() - started)
            assert response.status_code == 200
            assert response.headers["x-app"] == "inventory"
    return took


def test_a_hanging_mirror_neither_delays_nor_fails_the_real_calls(mesh: Mesh) -> None:
    broken = BrokenApp("hang")
    try:
        mesh.service("inventory")
        mesh.sidecar("shadow", broken.port)
        payment = caller(mesh, mirrored(100))
        mesh.wait_endpoints(payment, "inventory", 1)
        wait_mirror_endpoint(payment, "shadow")
        took = timed_calls(payment, 100)
        # Every copy hangs for its 30 s timeout: 4 are in flight, the rest dropped.
        assert max(took) < 1.0, max(took)
        assert payment.metric("opus_mirror_requests_total", result="dropped_in_flight") >= 95
    finally:
        broken.close()


def test_a_500_mirror_sees_its_share_and_the_real_calls_do_not(mesh: Mesh) -> None:
    broken = BrokenApp("500")
    try:
        mesh.service("inventory")
        mesh.sidecar("shadow", broken.port)
        payment = caller(mesh, mirrored(50))
        mesh.wait_endpoints(payment, "inventory", 1)
        mesh.wait_endpoints(payment, "shadow", 1)
        before = broken.seen
        timed_calls(payment, 200)
        import time

        deadline = time.monotonic() + 5
        while payment.metric("opus_mirror_requests_total", result="sent") < 60:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert 60 <= broken.seen - before <= 140  # 50% of 200, drawn at random
    finally:
        broken.close()


def test_a_hanging_mirror_leaves_the_latency_as_it_was_side_by_side(mesh: Mesh) -> None:
    """Two callers of one inventory, alike but for a mirror (behind a socket that never
    answers) on one of them, called in turns: the mirrored caller's p50 and p99 stay
    those of the plain one (the figures are printed; the bound is loose, the machine is
    shared)."""
    import statistics
    import time

    broken = BrokenApp("hang")
    try:
        mesh.service("inventory")
        mesh.sidecar("shadow", broken.port)
        plain_rules = {"inventory": {"route_rules": [{"name": "plain"}]}}
        plain = caller(mesh, plain_rules)
        mirroring = caller(mesh, mirrored(100))
        for sidecar in (plain, mirroring):
            mesh.wait_endpoints(sidecar, "inventory", 1)
        wait_mirror_endpoint(mirroring, "shadow")
        took: dict[str, list[float]] = {"plain": [], "mirrored": []}
        with (
            httpx.Client(base_url=plain.outbound, timeout=10) as a,
            httpx.Client(base_url=mirroring.outbound, timeout=10) as b,
        ):
            for _ in range(20):  # warm both paths
                a.get("/v1/invoke/inventory/echo")
                b.get("/v1/invoke/inventory/echo")
            for _ in range(300):
                for name, client in (("plain", a), ("mirrored", b)):
                    started = time.perf_counter()
                    assert client.get("/v1/invoke/inventory/echo").status_code == 200
                    took[name].append(time.perf_counter() - started)
        figures = {
            name: (statistics.median(t) * 1000, statistics.quantiles(t, n=100)[98] * 1000)
            for name, t in took.items()
        }
        print("p50/p99 ms:", {k: f"{p50:.2f}/{p99:.2f}" for k, (p50, p99) in figures.items()})
        assert figures["mirrored"][0] <= figures["plain"][0] * 1.5 + 1.0
        assert figures["mirrored"][1] <= figures["plain"][1] * 2 + 5.0
    finally:
        broken.close()
