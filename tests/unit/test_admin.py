"""Admin server: a real aiohttp server on 127.0.0.1 port 0, queried by a real client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import AdminServer, is_loopback, loopback_guard


class FakeState:
    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.metrics_registry = CollectorRegistry()
        self.calls = Counter(
            "opus_test_calls", "Calls.", ["service"], registry=self.metrics_registry
        )
        self.calls.labels(service="reviews").inc(3)
        self.reloads: list[str] = []
        self.reload_result = "ok"

    def clusters_snapshot(self) -> dict[str, Any]:
        return {"reviews": {"endpoints": [{"address": "10.0.0.7:9080", "healthy": True}]}}

    def begin_drain(self) -> None:
        self.draining = True

    # The rest of AdminState, which these tests do not call.
    def quit(self) -> None:
        self.begin_drain()

    def config_dump(self) -> dict[str, Any]:
        return {}

    def certs_snapshot(self) -> dict[str, Any]:
        return {"mode": "disable"}

    def set_log_level(self, level: str) -> None:
        pass

    async def reload_config(self, trigger: str) -> dict[str, Any]:
        self.reloads.append(trigger)
        return {"result": self.reload_result, "trigger": trigger}


@asynccontextmanager
async def serving(state: FakeState) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    server = AdminServer(state, "127.0.0.1", 0)
    port = await server.start()
    assert port > 0
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}"
    finally:
        await server.close()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_health_is_exact_and_up_while_draining() -> None:
    async def go() -> None:
        state = FakeState()
        async with serving(state) as (s, base):
            for draining in (False, True):
                state.draining = draining
                async with s.get(f"{base}/health") as r:
                    assert r.status == 200
                    assert r.content_type == "application/json"
                    assert await r.read() == b'{"status":"UP"}'

    run(go)


def test_ready_follows_state() -> None:
    async def go() -> None:
        state = FakeState()
        async with serving(state) as (s, base):
            async with s.get(f"{base}/ready") as r:
                assert (r.status, await r.json()) == (503, {"status": "NOT_READY"})
            state.ready = True
            async with s.get(f"{base}/ready") as r:
                assert (r.status, await r.json()) == (200, {"status": "READY"})
            state.draining = True
            async with s.get(f"{base}/ready") as r:
                assert (r.status, await r.json()) == (503, {"status": "DRAINING"})

    run(go)


def test_metrics_parse() -> None:
    async def go() -> None:
        async with serving(FakeState()) as (s, base):
            async with s.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            sample = families["opus_test_calls"].samples[0]
            assert sample.labels == {"service": "reviews"}
            assert sample.value == 3.0

            headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with s.get(f"{base}/metrics", headers=headers) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await r.text()).endswith("# EOF\n")

    run(go)


def test_clusters_json() -> None:
    async def go() -> None:
        state = FakeState()
        async with serving(state) as (s, base), s.get(f"{base}/clusters") as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            assert json.loads(await r.text()) == state.clusters_snapshot()

    run(go)


def test_drain_from_loopback() -> None:
    async def go() -> None:
        state = FakeState()
        state.ready = True
        async with serving(state) as (s, base):
            async with s.post(f"{base}/drain") as r:
                assert (r.status, await r.json()) == (200, {"status": "DRAINING"})
            assert state.draining
            async with s.get(f"{base}/ready") as r:
                assert r.status == 503

    run(go)


@pytest.mark.parametrize(("result", "status"), [("ok", 200), ("invalid", 422), ("refused", 409)])
def test_config_reload_is_a_loopback_post(result: str, status: int) -> None:
    async def go() -> None:
        state = FakeState()
        state.reload_result = result
        async with serving(state) as (s, base):
            async with s.post(f"{base}/config/reload") as r:
                assert (r.status, (await r.json())["result"]) == (status, result)
            async with s.get(f"{base}/config/reload") as r:
                assert r.status == 405  # a reload changes state: POST only
        assert state.reloads == ["admin"]

    run(go)


def test_unknown_path_and_method_are_json() -> None:
    async def go() -> None:
        async with serving(FakeState()) as (s, base):
            async with s.get(f"{base}/nope") as r:
                assert r.status == 404
                assert "error" in await r.json()
            async with s.get(f"{base}/drain") as r:
                assert r.status == 405
                assert "error" in await r.json()

    run(go)


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("192.168.1.1", False),
        ("::ffff:10.0.0.5", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("", False),
        (None, False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback(addr: str | None, expected: bool) -> None:
    assert is_loopback(addr) is expected


def _guarded(method: str, remote: str) -> tuple[web.StreamResponse, list[str]]:
    reached: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        reached.append(request.path)
        return web.Response(text="ok")

    async def go() -> web.StreamResponse:
        request = make_mocked_request(method, "/drain").clone(remote=remote)
        return await loopback_guard(request, handler)

    return asyncio.run(go()), reached


def test_guard_refuses_state_change_from_pod_network() -> None:
    response, reached = _guarded("POST", "10.0.0.5")
    assert response.status == 403
    assert isinstance(response, web.Response) and response.body is not None
    body = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert "only answers loopback callers" in body["error"]
    assert reached == []


def test_guard_passes_loopback_and_reads() -> None:
    assert _guarded("POST", "::ffff:127.0.0.1")[0].status == 200
    response, reached = _guarded("GET", "10.0.0.5")
    assert response.status == 200
    assert reached == ["/drain"]
