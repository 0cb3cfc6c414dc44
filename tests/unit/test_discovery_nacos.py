"""The Nacos backend against the Nacos emulator (tests/emulators/nacos_emulator.py, which
follows Nacos's v1 and v2 Open API pages), in process on 127.0.0.1 port 0.

Each test runs on a VirtualTimeLoop (tests/unit/faketime.py) and the emulator ages
beats by that loop's clock: the beats, polls and expiries of several seconds take
none, and nothing here waits in real time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.config import AppConfig, NacosDiscoveryConfig
from sidecar.discovery.base import Endpoint, Instance
from sidecar.discovery.nacos import NacosDiscovery, parse_hosts
from tests.emulators import nacos_emulator
from tests.unit.faketime import run_virtual


def test_parse_hosts_keeps_healthy_enabled_instances() -> None:
    hosts = [
        {
            "ip": "10.0.0.2",
            "port": 2,
            "healthy": True,
            "metadata": {"zone": "z"},
            "instanceId": "b",
        },
        {"ip": "10.0.0.1", "port": 1, "healthy": False},
        {"ip": "10.0.0.3", "port": 3, "enabled": False},
        {"ip": "10.0.0.4", "port": 0},
    ]
    assert parse_hosts(hosts) == (Endpoint("10.0.0.2", 2, zone="z", instance_id="b"),)


async def _until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


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


def _scenario(v1_only: bool) -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        runner, port = await nacos_emulator.serve("127.0.0.1", 0, 0.6, 5.0, v1_only, clock)
        app_runner, app_port, app_status = await _health_app()
        cfg = NacosDiscoveryConfig(
            address=f"127.0.0.1:{port}",
            namespace="ns1",
            group="G",
            beat_interval=1.0,
            poll_interval=0.05,
        )
        me = NacosDiscovery(cfg, AppConfig(port=app_port))
        caller = NacosDiscovery(cfg, AppConfig())
        other_ns = NacosDiscovery(
            NacosDiscoveryConfig(address=f"127.0.0.1:{port}", poll_interval=0.05), AppConfig()
        )
        try:
            await me.start()
            await caller.start()
            await other_ns.start()
            await me.register(Instance("orders", "o-1", "127.0.0.1", 4321, zone="z1"))
            assert me.api == ("v1" if v1_only else "v2")
            await _until("service list", lambda: "orders" in caller.services())
            assert caller.endpoints("orders") == ()
            want = (
                Endpoint(
                    "127.0.0.1", 4321, zone="z1", instance_id="127.0.0.1#4321#DEFAULT#G@@orders"
                ),
            )
            await _until("instance", lambda: caller.endpoints("orders") == want)
            assert other_ns.endpoints("orders") is None  # another namespace and group
            # Beats keep it healthy past the emulator's 0.6 s unhealthy-after.
            await asyncio.sleep(1.5)
            assert caller.endpoints("orders") == want
            app_status["code"] = 503  # the app dies: the sidecar takes it out
            await _until("removal", lambda: caller.endpoints("orders") == ())
            app_status["code"] = 200
            await _until("return", lambda: caller.endpoints("orders") == want)
            await me.deregister()
            await _until("deregistered", lambda: caller.endpoints("orders") == ())
        finally:
            for d in (me, caller, other_ns):
                await d.close()
            await app_runner.cleanup()
            await runner.cleanup()

    run_virtual(main())


def test_v2_open_api() -> None:
    _scenario(v1_only=False)


def test_falls_back_to_v1_on_a_1x_server() -> None:
    _scenario(v1_only=True)


def test_emulator_marks_instances_unhealthy_without_beats() -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        runner, port = await nacos_emulator.serve("127.0.0.1", 0, 0.3, 5.0, False, clock)
        base = f"http://127.0.0.1:{port}/nacos/v2/ns"
        try:
            async with aiohttp.ClientSession() as http:
                params = {"serviceName": "s", "ip": "1.2.3.4", "port": "80"}
                async with http.post(f"{base}/instance", data=params) as r:
                    assert (await r.json())["code"] == 0
                listing = {"serviceName": "s", "healthyOnly": "true"}
                async with http.get(f"{base}/instance/list", params=listing) as r:
                    assert len((await r.json())["data"]["hosts"]) == 1
                await asyncio.sleep(0.5)
                async with http.get(f"{base}/instance/list", params=listing) as r:
                    assert (await r.json())["data"]["hosts"] == []
                beat = {"serviceName": "s", "ip": "9.9.9.9", "port": "1"}
                async with http.put(f"{base}/instance/beat", params=beat) as r:
                    assert (await r.json())["data"]["code"] == nacos_emulator.BEAT_NOT_FOUND
        finally:
            await runner.cleanup()

    run_virtual(main())
