"""The Consul backend against the Consul emulator (tests/emulators/consul_emulator.py,
which follows Consul's documented HTTP API), in process on 127.0.0.1 port 0; plus the
blocking-query rules and the parsing, without sockets.

The emulator tests run on a VirtualTimeLoop (tests/unit/faketime.py) and the emulator
keeps TTLs and blocking waits by that loop's clock: nothing waits in real time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.config import AppConfig, ConsulDiscoveryConfig
from sidecar.discovery.base import Endpoint, Instance
from sidecar.discovery.consul import ConsulDiscovery, TokenBucket, next_index, parse_health
from sidecar.metrics import Metrics
from tests.emulators import consul_emulator
from tests.unit.faketime import run_virtual


def test_index_resets_when_it_goes_backwards_and_never_drops_below_one() -> None:
    assert next_index(10, "12") == 12
    assert next_index(10, 7) == 0  # went backwards: a fresh read
    assert next_index(0, 0) == 1
    assert next_index(5, "junk") == 0


def test_token_bucket_allows_a_burst_of_two_then_paces() -> None:
    clock = [0.0]
    bucket = TokenBucket(rate=4.0, burst=2, now=lambda: clock[0])
    assert bucket.delay() == 0.0
    assert bucket.delay() == 0.0
    assert bucket.delay() == 0.25
    clock[0] += 10.0
    assert bucket.delay() == 0.0


def test_parse_health_uses_service_address_then_node_address() -> None:
    entries = [
        {"Node": {"Address": "10.0.0.9"}, "Service": {"ID": "b", "Address": "", "Port": 2}},
        {
            "Node": {"Address": "10.0.0.9"},
            "Service": {
                "ID": "a",
                "Address": "10.0.0.1",
                "Port": 1,
                "Meta": {"zone": "z1"},
                "Weights": {"Passing": 3},
            },
        },
        {"Node": {}, "Service": {"ID": "bad", "Port": 0}},
    ]
    assert parse_health(entries) == (
        Endpoint("10.0.0.1", 1, zone="z1", weight=3, instance_id="a"),
        Endpoint("10.0.0.9", 2, instance_id="b"),
    )


async def _until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _with_emulator(
    body: Callable[[dict[str, int], consul_emulator.State], Awaitable[None]],
) -> None:
    clock = asyncio.get_running_loop().time
    state, runners, ports = await consul_emulator.serve("127.0.0.1", 0, ["dc1", "dc2"], clock)
    reaper = asyncio.create_task(consul_emulator._reaper(state))
    try:
        await body(ports, state)
    finally:
        reaper.cancel()
        for runner in runners:
            await runner.cleanup()


async def _health_app() -> tuple[web.AppRunner, int, dict[str, int]]:
    status = {"code": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1], status


def _config(port: int, **kw: Any) -> ConsulDiscoveryConfig:
    return ConsulDiscoveryConfig(
        address=f"http://127.0.0.1:{port}", wait=2.0, check_interval=0.1, **kw
    )


def test_register_watch_fail_and_deregister() -> None:
    async def body(ports: dict[str, int], state: consul_emulator.State) -> None:
        app_runner, app_port, app_status = await _health_app()
        app = AppConfig(host="127.0.0.1", port=app_port)
        me = ConsulDiscovery(_config(ports["dc1"]), app)
        caller = ConsulDiscovery(_config(ports["dc1"]), AppConfig())
        try:
            await me.start()
            await caller.start()
            instance = Instance("inventory", "inv-1", "127.0.0.1", 15999, zone="z1", tags=("t",))
            await me.register(instance)
            dc1 = state.dcs["dc1"]
            assert dc1.services["inv-1"].meta["zone"] == "z1"
            check = dc1.checks["service:inv-1"]
            assert check.ttl == 3.0 and check.deregister_after == 60.0 and check.status == "passing"
            await _until("catalog", lambda: "inventory" in caller.services())
            seen: list[tuple[Endpoint, ...]] = []
            caller.subscribe("inventory", lambda s, eps: seen.append(eps))
            assert caller.endpoints("inventory") == ()  # watch starts on first use
            want = (Endpoint("127.0.0.1", 15999, zone="z1", instance_id="inv-1"),)
            await _until("endpoint", lambda: caller.endpoints("inventory") == want)
            assert seen[-1] == want
            app_status["code"] = 500  # the app turns unhealthy: its check fails, it leaves
            await _until("removal", lambda: caller.endpoints("inventory") == ())
            assert dc1.checks["service:inv-1"].status == "critical"
            app_status["code"] = 200
            await _until("return", lambda: caller.endpoints("inventory") == want)
            await me.deregister()
            assert "inv-1" not in dc1.services
            await _until("deregistered", lambda: caller.endpoints("inventory") == ())
        finally:
            await me.close()
            await caller.close()
            await app_runner.cleanup()

    run_virtual(_with_emulator(body))


def test_failover_to_another_datacenter_and_back() -> None:
    async def body(ports: dict[str, int], state: consul_emulator.State) -> None:
        caller = ConsulDiscovery(
            _config(ports["dc1"], failover_datacenters=("dc2",), watch=("pay",)), AppConfig()
        )
        async with aiohttp.ClientSession() as http:

            async def place(dc: str, sid: str, port: int) -> None:
                payload = {
                    "Datacenter": dc,
                    "Node": f"n-{dc}",
                    "Address": "127.0.0.1",
                    "Service": {"ID": sid, "Service": "pay", "Port": port},
                    "Check": {"CheckID": f"c-{sid}", "Status": "passing", "ServiceID": sid},
                }
                async with http.put(
                    f"http://127.0.0.1:{ports['dc1']}/v1/catalog/register", json=payload
                ) as r:
                    assert r.status == 200

            try:
                await place("dc2", "pay-remote", 2000)
                await caller.start()
                assert caller.endpoints("pay") == (
                    Endpoint("127.0.0.1", 2000, instance_id="pay-remote"),
                )
                await place("dc1", "pay-local", 1000)
                await _until(
                    "local dc preferred",
                    lambda: (
                        caller.endpoints("pay")
                        == (Endpoint("127.0.0.1", 1000, instance_id="pay-local"),)
                    ),
                )
            finally:
                await caller.close()

    run_virtual(_with_emulator(body))


def test_outage_keeps_last_known_endpoints_sets_stale_and_recovers() -> None:
    async def body(ports: dict[str, int], state: consul_emulator.State) -> None:
        metrics = Metrics()
        app_runner, app_port, _ = await _health_app()
        writer = ConsulDiscovery(_config(ports["dc1"]), AppConfig(port=app_port))
        caller = ConsulDiscovery(_config(ports["dc1"], watch=("svc",), retry_max=0.2), AppConfig())
        caller.bind_metrics(metrics)
        async with aiohttp.ClientSession() as http:

            async def outage(down: bool) -> None:
                url = f"http://127.0.0.1:{ports['dc1']}/_emulator/outage"
                async with http.put(url, json={"down": down}) as r:
                    assert r.status == 200

            def stale() -> float:
                return (
                    metrics.registry.get_sample_value("opus_discovery_stale", {"backend": "consul"})
                    or 0.0
                )

            try:
                await writer.start()
                await writer.register(Instance("svc", "svc-1", "127.0.0.1", 1234))
                await caller.start()
                want = (Endpoint("127.0.0.1", 1234, instance_id="svc-1"),)
                await _until("endpoint", lambda: caller.endpoints("svc") == want)
                await outage(True)
                await _until("stale", lambda: stale() == 1.0)
                assert caller.endpoints("svc") == want  # still routing on the last set
                errors = metrics.registry.get_sample_value(
                    "opus_discovery_errors_total", {"backend": "consul"}
                )
                assert errors is not None and errors >= 1
                await outage(False)
                await _until("recovered", lambda: stale() == 0.0)
                assert caller.endpoints("svc") == want
            finally:
                await writer.close()
                await caller.close()
                await app_runner.cleanup()

    run_virtual(_with_emulator(body))


def test_ttl_check_goes_critical_without_refresh_in_the_emulator() -> None:
    async def body(ports: dict[str, int], state: consul_emulator.State) -> None:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{ports['dc1']}"
            reg = {
                "Name": "x",
                "ID": "x1",
                "Port": 1,
                "Check": {
                    "CheckID": "cx",
                    "TTL": "200ms",
                    "Status": "passing",
                    "DeregisterCriticalServiceAfter": "300ms",
                },
            }
            async with http.put(f"{base}/v1/agent/service/register", json=reg) as r:
                assert r.status == 200
            async with http.get(f"{base}/v1/health/service/x?passing") as r:
                assert len(await r.json()) == 1
                index = r.headers["X-Consul-Index"]
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with http.get(f"{base}/v1/health/service/x?passing&index={index}&wait=5s") as r:
                assert await r.json() == []  # the blocking query returned on the TTL expiring
            assert loop.time() - started < 2.0
            await _until("reaped", lambda: "x1" not in state.dcs["dc1"].services)

    run_virtual(_with_emulator(body))
