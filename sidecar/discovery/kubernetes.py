"""The Kubernetes backend: a headless Service's endpoints through cluster DNS.

A headless Service (`clusterIP: None`) has one A/AAAA record per ready pod at
`<service>.<namespace>.svc.<cluster-domain>`; kube-proxy and the API server are not
involved, and neither is a client library or an RBAC grant to watch EndpointSlices.
Each service asked for is re-resolved every `resolve_interval` (default 1 s) with
the event loop's getaddrinfo; the port is the peers' inbound port from the config
(every sidecar listens on the same one). Registration is Kubernetes's business (the
pod's readiness gates its DNS record), so register/deregister do nothing.

DNS cannot list services, so `services()` is what `watch` names (plus any name that has
resolved): list in `discovery.kubernetes.watch` every service the app calls.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from sidecar.config import KubernetesDiscoveryConfig
from sidecar.discovery.base import Discovery, Endpoint, Instance
from sidecar.health import RegistryHealth
from sidecar.metrics import Metrics

logger = logging.getLogger("sidecar.discovery.kubernetes")

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

Resolver = Callable[[str, int], Awaitable[list[str]]]


def pod_namespace(path: str = NAMESPACE_FILE) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA), deduplicated, in a stable order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class KubernetesDiscovery(Discovery):
    def __init__(
        self, config: KubernetesDiscoveryConfig, *, resolver: Resolver | None = None
    ) -> None:
        super().__init__()
        self._config = config
        self._namespace = config.namespace or pod_namespace()
        self._resolve = resolver or resolve_addresses
        self._status = RegistryHealth("kubernetes", logger)
        self._services: frozenset[str] = frozenset(config.watch)
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def bind_metrics(self, metrics: Metrics) -> None:
        self._status.bind(metrics)

    def fqdn(self, service: str) -> str:
        return f"{service}.{self._namespace}.svc.{self._config.cluster_domain}"

    async def start(self) -> None:
        await asyncio.gather(*(self.resolve_once(s) for s in self._config.watch))
        for service in self._config.watch:
            self._ensure(service)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def services(self) -> frozenset[str]:
        return self._services

    def endpoints(self, service: str) -> tuple[Endpoint, ...] | None:
        found = self._endpoints.get(service)
        if found is not None:
            return found
        if service not in self._services:
            return None
        self._ensure(service)
        return self._endpoints.setdefault(service, ())

    async def register(self, instance: Instance) -> None:
        logger.debug("kubernetes discovery: the pod's readiness registers %s", instance.service)

    async def deregister(self) -> None:
        return None

    def _ensure(self, service: str) -> None:
        if service not in self._tasks:
            self._tasks[service] = asyncio.get_running_loop().create_task(
                self._watch(service), name=f"k8s-dns-{service}"
            )

    async def _watch(self, service: str) -> None:
        while True:
            await self.resolve_once(service)
            await asyncio.sleep(self._config.resolve_interval)

    async def resolve_once(self, service: str) -> tuple[Endpoint, ...] | None:
        """Resolve `service` once; None (and the last set kept) when DNS failed."""
        port = self._config.port
        try:
            async with asyncio.timeout(self._config.resolve_timeout):
                addresses = await self._resolve(self.fqdn(service), port)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                addresses = []  # NXDOMAIN: no ready pod (or no such service)
            else:
                self._status.failed(f"resolving {service}", exc)
                return None
        except (OSError, TimeoutError) as exc:
            self._status.failed(f"resolving {service}", exc)
            return None
        self._status.ok()
        endpoints = tuple(
            Endpoint(host=a, port=port, instance_id=a) for a in sorted(set(addresses))
        )
        if addresses and service not in self._services:
            self._services = self._services | {service}
        if self._endpoints.get(service) != endpoints:
            self._endpoints[service] = endpoints
            self._notify(service, endpoints)
        return endpoints
