"""The static backend and the factory's choice of it."""

from __future__ import annotations

import asyncio

from sidecar.config import (
    DiscoveryConfig,
    SidecarConfig,
    StaticDiscoveryConfig,
    StaticEndpoint,
)
from sidecar.discovery.base import Endpoint, Instance
from sidecar.discovery.factory import create_discovery
from sidecar.discovery.static import StaticDiscovery

CONFIG = StaticDiscoveryConfig(
    services={
        "orders": (
            StaticEndpoint("10.0.0.1", 15006, zone="a"),
            StaticEndpoint("10.0.0.2", 15006, zone="b", weight=3),
        ),
        "empty": (),
    }
)


def test_returns_configured_endpoints() -> None:
    discovery = StaticDiscovery(CONFIG)
    assert discovery.endpoints("orders") == (
        Endpoint("10.0.0.1", 15006, zone="a"),
        Endpoint("10.0.0.2", 15006, zone="b", weight=3),
    )
    assert discovery.endpoints("empty") == ()
    assert discovery.services() == frozenset({"orders", "empty"})


def test_unknown_service_is_none() -> None:
    assert StaticDiscovery(CONFIG).endpoints("nope") is None


def test_lifecycle_and_registration_are_no_ops() -> None:
    heard: list[str] = []

    async def main() -> None:
        discovery = StaticDiscovery(CONFIG)
        discovery.subscribe("orders", lambda service, _eps: heard.append(service))
        await discovery.start()
        await discovery.register(Instance("orders", "orders-1", "127.0.0.1", 9000))
        await discovery.deregister()
        await discovery.close()
        assert discovery.endpoints("orders") == StaticDiscovery(CONFIG).endpoints("orders")

    asyncio.run(main())
    assert heard == []


def test_factory_builds_static_backend() -> None:
    cfg = SidecarConfig(discovery=DiscoveryConfig(backend="static", static=CONFIG))
    discovery = create_discovery(cfg)
    assert isinstance(discovery, StaticDiscovery)
    assert discovery.endpoints("orders") is not None
