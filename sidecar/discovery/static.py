"""The static backend: services and endpoints fixed in the config file.

For meshes small enough to write down, and for tests. Nothing changes after
start, so nothing is ever notified; registration is accepted and ignored
because there is no registry to write to.
"""

from __future__ import annotations

import logging

from sidecar.config import StaticDiscoveryConfig
from sidecar.discovery.base import Discovery, Endpoint, Instance

logger = logging.getLogger("sidecar.discovery")


class StaticDiscovery(Discovery):
    def __init__(self, config: StaticDiscoveryConfig) -> None:
        super().__init__()
        # Built once: endpoints() is on the call path and must not allocate.
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {
            service: tuple(
                Endpoint(
                    host=ep.host,
                    port=ep.port,
                    zone=ep.zone,
                    weight=ep.weight,
                    meta=frozenset(ep.meta.items()),
                )
                for ep in endpoints
            )
            for service, endpoints in config.services.items()
        }
        self._services = frozenset(self._endpoints)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def services(self) -> frozenset[str]:
        return self._services

    def endpoints(self, service: str) -> tuple[Endpoint, ...] | None:
        return self._endpoints.get(service)

    async def register(self, instance: Instance) -> None:
        logger.debug(
            "static discovery: not registering %s/%s (no registry)",
            instance.service,
            instance.instance_id,
        )

    async def deregister(self) -> None:
        logger.debug("static discovery: nothing to deregister")
