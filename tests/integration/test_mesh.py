"""The spine end to end: a call crosses the outbound sidecar, HTTP/2, the inbound
sidecar and the app, with real clients (httpx, curl, nghttp, h2load)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Mesh

pytestmark = pytest.mark.integration


def _pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


def test_http1_call_crosses_two_sidecars_over_h2(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    body = json.dumps({"item": "sku-1", "quantity": 2}).encode()
    resp = httpx.post(
        f"{payment.outbound}/v1/invoke/inventory/reserve?trace=1",
        content=body,
        headers={
            "content-type": "application/json",
            "x-custom": "kept",
            "connection": "x-hop",
            "x-hop": "dropped",
        },
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    echoed = resp.json()
    assert echoed["app"] == "inventory"
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/reserve?trace=1"
    assert echoed["host"] == "inventory"
    assert echoed["headers"]["x-custom"] == "kept"
    assert "x-hop" not in echoed["headers"]  # named in Connection: hop-by-hop
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert resp.headers["x-app"] == "inventory"
    assert resp.headers["x-opus-upstream-protocol"] == "h2c"
    assert resp.headers["x-opus-upstream"] == f"127.0.0.1:{inventory.ports['inbound']}"
    # Both hops are in the metrics, by direction and service.
    assert (
        payment.metric("opus_requests_total", direction="outbound", service="inventory", code="200")
        == 1
    )
    assert (
        inventory.metric(
            "opus_requests_total", direction="inbound", service="inventory", code="200"
        )
        == 1
    )
    assert payment.metric("opus_upstream_connections", service="inventory", protocol="h2c") == 1


def test_http_proxy_unmodified_clients(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    env = dict(os.environ, http_proxy=payment.outbound, HTTP_PROXY=payment.outbound, no_proxy="")
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", "-d", "qty=1", "http://inventory/reserve"],
        env=env, capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    echoed = json.loads(out.stdout)
    assert echoed["app"] == "inventory" and echoed["path"] == "/reserve" and echoed["body_len"] == 5
    # httpx honours HTTP_PROXY from the environment too (trust_env).
    script = "import httpx,sys; r=httpx.get('http://inventory:80/x?y=1'); sys.stdout.write(r.text)"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=20, check=True
    )
    assert json.loads(out.stdout)["path"] == "/x?y=1"


def test_host_header_and_k8s_names_route(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    for host in ("inventory", "inventory:80", "inventory.default.svc.cluster.local"):
        resp = httpx.get(f"{payment.outbound}/stock", headers={"host": host}, timeout=10)
        assert resp.status_code == 200, (host, resp.text)
        assert resp.json()["app"] == "inventory"


def test_explicit_prefix_route(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service(
        "payment", {"routes": [{"prefix": "/api/stock", "service": "inventory"}]}
    )
    resp = httpx.get(f"{payment.outbound}/api/stock/1", timeout=10)
    assert resp.status_code == 200
    assert resp.json()["path"] == "/api/stock/1"


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp (nghttp2-client) not installed")
def test_h2c_client_through_the_mesh(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    data = mesh.workdir / "body.json"
    data.write_bytes(b'{"n":1}')
    out = subprocess.run(
        ["nghttp", "-v", "-d", str(data), f"{payment.outbound}/v1/invoke/inventory/reserve"],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    text = out.stdout.decode()
    assert "recv HEADERS frame" in text and ":status: 200" in text
    assert "x-opus-upstream-protocol: h2c" in text
    body = text[text.index('{"app"') :].split("\n", 1)[0]
    assert '"body_len": 7' in body or '"body_len":7' in body


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_through_the_mesh_reuses_one_connection(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    out = subprocess.run(
        ["h2load", "-n", "400", "-c", "4", "-m", "10", f"{payment.outbound}/v1/invoke/inventory/x"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    text = out.stdout.decode()
    assert "400 succeeded, 0 failed, 0 errored" in text, text
    assert "status codes: 400 2xx" in text, text
    # 400 calls over 4 client connections, one HTTP/2 connection between the sidecars.
    assert payment.metric("opus_upstream_connections_opened_total", service="inventory") == 1
    assert inventory.metric("opus_requests_total", direction="inbound", code="200") == 400


def test_large_bodies_stream_both_ways(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    size = 5 * 1024 * 1024 + 123  # far past the 64 KiB stream and 1 MiB connection windows
    payload = _pattern(size)

    def chunks() -> Iterator[bytes]:
        for i in range(0, size, 100_000):
            yield payload[i : i + 100_000]

    resp = httpx.post(
        f"{payment.outbound}/v1/invoke/inventory/upload", content=chunks(), timeout=30
    )
    assert resp.status_code == 200
    assert resp.json()["body_len"] == size
    assert resp.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()
    with httpx.stream(
        "GET", f"{payment.outbound}/v1/invoke/inventory/data?n={size}", timeout=30
    ) as r:
        assert r.status_code == 200
        digest = hashlib.sha256()
        got = 0
        for chunk in r.iter_bytes():
            digest.update(chunk)
            got += len(chunk)
    assert got == size
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_pool_bounds_upstream_connections(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {"upstream": {"max_per_route": 2}})
    with httpx.Client(timeout=10) as client:
        for _ in range(30):
            assert client.get(f"{payment.outbound}/v1/invoke/inventory/seq").status_code == 200

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=50)) as client:
            calls = [client.get(f"{payment.outbound}/v1/invoke/inventory/par") for _ in range(150)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 150
    opened = payment.metric("opus_upstream_connections_opened_total", service="inventory")
    assert 1 <= opened <= 2


def test_unknown_service_gets_503_json(mesh: Mesh) -> None:
    _, payment = mesh.service("payment")
    resp = httpx.post(f"{payment.outbound}/v1/invoke/nosuch/create", json={}, timeout=10)
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"error": "unknown service 'nosuch'", "status": 503, "service": "nosuch"}
    resp = httpx.get(f"{payment.outbound}/anything", headers={"host": "elsewhere"}, timeout=10)
    assert resp.status_code == 503 and resp.json()["service"] == "elsewhere"
    # gRPC callers get a gRPC status, not a bare HTTP error.
    resp = httpx.post(
        f"{payment.outbound}/v1/invoke/nosuch/pkg.Svc/M",
        headers={"content-type": "application/grpc"}, content=b"", timeout=10,
    )  # fmt: skip
    assert resp.status_code == 200 and resp.headers["grpc-status"] == "14"


def test_service_without_endpoints_gets_503(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 1)
    inventory.signal(signal.SIGTERM)
    assert inventory.wait() == 0
    mesh.wait_endpoints(payment, "inventory", 0)
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", timeout=10)
    assert resp.status_code == 503
    assert "no healthy endpoint" in resp.json()["error"]


def test_health_body_is_exact(mesh: Mesh) -> None:
    _, payment = mesh.service("payment")
    resp = httpx.get(f"{payment.admin}/health", timeout=5)
    assert resp.status_code == 200
    assert resp.content == b'{"status":"UP"}'


def test_sigterm_finishes_in_flight_calls(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(
            httpx.get(f"{payment.outbound}/v1/invoke/inventory/slow?ms=1500", timeout=20)
        )

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    # Wait until the three calls reached the app (a real signal: the inbound in-flight count).
    _wait_in_flight(inventory, 3)
    inventory.signal(signal.SIGTERM)
    payment.signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert inventory.wait() == 0
    assert payment.wait() == 0


def _wait_in_flight(sidecar: object, count: int, at_most: bool = False) -> None:
    """Poll the sidecar's /clusters until its app has `count` calls in flight (or at most)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        clusters = httpx.get(f"{sidecar.admin}/clusters", timeout=5).json()  # type: ignore[attr-defined]
        inbound = next(iter(clusters["inbound"].values()))
        active = sum(e["active_requests"] for e in inbound["endpoints"])
        if (active <= count) if at_most else (active >= count):
            return
        time.sleep(0.02)
    raise AssertionError(f"in-flight calls never reached {count}")


def test_goaway_under_load_loses_no_call(mesh: Mesh) -> None:
    """A peer that drains (GOAWAY) mid-load: calls it had not started go to the other one."""
    _, first = mesh.service("inventory")
    _, _second = mesh.service("inventory")
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 2)

    async def load() -> list[int]:
        statuses: list[int] = []
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=20)) as client:

            async def worker(n: int) -> None:
                for i in range(40):
                    r = await client.post(
                        f"{payment.outbound}/v1/invoke/inventory/w{n}", content=b"x" * 100
                    )
                    statuses.append(r.status_code)
                    if n == 0 and i == 10:
                        first.signal(signal.SIGTERM)

            await asyncio.gather(*(worker(n) for n in range(10)))
        return statuses

    statuses = asyncio.run(load())
    assert first.wait() == 0
    assert len(statuses) == 400
    assert statuses.count(200) == 400, {s: statuses.count(s) for s in set(statuses)}


def test_caller_going_away_resets_the_upstream_call(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{payment.outbound}/v1/invoke/inventory/slow?ms=4000", timeout=0.5)
    # The reset travels: the inbound sidecar drops its call to the app long before 4 s.
    _wait_in_flight(inventory, 0, at_most=True)
    access = (mesh.workdir / f"{inventory.name}.access.log").read_text().splitlines()
    assert json.loads(access[-1])["flags"] == "DC"
    # The HTTP/2 connection between the sidecars survived the reset.
    assert httpx.get(f"{payment.outbound}/v1/invoke/inventory/ok", timeout=10).status_code == 200
    assert payment.metric("opus_upstream_connections_opened_total", service="inventory") == 1


def test_app_behind_h2c(mesh: Mesh) -> None:
    """app.protocol h2c: the inbound sidecar reaches its app over HTTP/2 (here the app is
    another sidecar's inbound listener, which speaks h2c, in front of the echo app)."""
    echo = mesh.app("inventory")
    front = mesh.sidecar("backend", echo.ports["port"], {"discovery": {"register": False}})
    mesh.sidecar("inventory", front.ports["inbound"], {"app": {"protocol": "h2c"}})
    _, payment = mesh.service("payment")
    resp = httpx.post(f"{payment.outbound}/v1/invoke/inventory/h2app", content=b"abc", timeout=10)
    assert resp.status_code == 200 and resp.json()["body_len"] == 3
    assert front.metric("opus_requests_total", direction="inbound", code="200") == 1


def test_draining_sidecar_reports_not_ready(mesh: Mesh) -> None:
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service("payment")
    thread = threading.Thread(
        target=lambda: httpx.get(f"{payment.outbound}/v1/invoke/inventory/slow?ms=2000", timeout=20)
    )
    thread.start()
    _wait_in_flight(inventory, 1)
    inventory.signal(signal.SIGTERM)
    import time

    deadline = time.monotonic() + 5
    status = 0
    while time.monotonic() < deadline:
        status = httpx.get(f"{inventory.admin}/ready", timeout=5).status_code
        if status == 503:
            break
    assert status == 503
    assert httpx.get(f"{inventory.admin}/health", timeout=5).content == b'{"status":"UP"}'
    thread.join(20)
    assert inventory.wait() == 0
