"""Clusters: a service's endpoints (kept current by discovery), its balancer and its pool.

`forward()` is where a call meets the upstream: pick an endpoint, send, and when
the peer provably never saw the call (connect failure, refused stream, GOAWAY)
send it again to another endpoint while the body can still be replayed.
"""

from __future__ import annotations

from typing import Any

from sidecar.config import SidecarConfig
from sidecar.discovery.base import Discovery, Endpoint
from sidecar.errors import RETRY_SAFE, NoHealthyUpstream
from sidecar.lb import Balancer, make_balancer
from sidecar.metrics import Metrics
from sidecar.proto.messages import Request, Response
from sidecar.upstream.h1client import H1Pool
from sidecar.upstream.h2pool import H2Pool
from sidecar.upstream.pool import Pool, PoolLimits

# Resends of a call the peer never saw; each goes to another endpoint when there is one.
MAX_SAFE_RESENDS = 3


class Cluster:
    def __init__(self, name: str, pool: Pool, balancer: Balancer) -> None:
        self.name = name
        self.pool = pool
        self.balancer = balancer
        self.endpoints: tuple[Endpoint, ...] = ()
        self.active: dict[Endpoint, int] = {}

    def update(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints

    async def forward(
        self, request: Request, authority: bytes, path: bytes, avoid: list[Endpoint] | None = None
    ) -> tuple[Response, Endpoint]:
        """Send the call to an endpoint (one not in `avoid` when there is one).

        Endpoints count as active from the send until the response head arrives, which
        is what least-request balances on.
        """
        tried: list[Endpoint] = list(avoid) if avoid else []
        first_try = len(tried)
        while True:
            endpoint = self.balancer.pick(self.endpoints, self.active, tried)
            if endpoint is None:
                raise NoHealthyUpstream(
                    f"service {self.name!r} has no healthy endpoint", service=self.name
                )
            active = self.active
            active[endpoint] = active.get(endpoint, 0) + 1
            try:
                return await self.pool.request(endpoint, request, authority, path), endpoint
            except RETRY_SAFE:
                tried.append(endpoint)
                if len(tried) - first_try > MAX_SAFE_RESENDS or not request.body.rewind():
                    raise
            finally:
                self.release(endpoint)

    def release(self, endpoint: Endpoint) -> None:
        count = self.active.get(endpoint, 0) - 1
        if count > 0:
            self.active[endpoint] = count
        else:
            self.active.pop(endpoint, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "endpoints": [
                {
                    "address": e.address,
                    "zone": e.zone,
                    "instance_id": e.instance_id,
                    "health": "healthy",
                    "active_requests": self.active.get(e, 0),
                    "pool": self.pool.snapshot(e),
                }
                for e in self.endpoints
            ],
            "balancer": type(self.balancer).__name__,
            "connections": self.pool.connection_count(),
        }


def pool_limits(cfg: SidecarConfig, service: str) -> PoolLimits:
    up = cfg.upstream
    override = cfg.services.get(service)
    return PoolLimits(
        max_connections=(override and override.max_connections) or up.max_connections,
        max_per_route=(override and override.max_per_route) or up.max_per_route,
        idle_timeout=up.idle_timeout,
        connect_timeout=up.connect_timeout,
        pending_timeout=up.pending_timeout,
    )


class ClusterManager:
    """One cluster per service the local app calls, created on first use."""

    def __init__(self, cfg: SidecarConfig, discovery: Discovery, metrics: Metrics) -> None:
        self.cfg = cfg
        self.discovery = discovery
        self.metrics = metrics
        self.clusters: dict[str, Cluster] = {}

    def knows(self, service: str) -> bool:
        return service in self.clusters or service in self.discovery.services()

    def get(self, service: str) -> Cluster | None:
        cluster = self.clusters.get(service)
        if cluster is not None:
            return cluster
        endpoints = self.discovery.endpoints(service)
        if endpoints is None:
            return None
        cfg = self.cfg
        override = cfg.services.get(service)
        policy = (override and override.lb_policy) or cfg.upstream.lb_policy
        limits = pool_limits(cfg, service)
        pool: Pool
        if cfg.upstream.protocol == "h2c":
            pool = H2Pool(service, limits, self.metrics)
        else:
            pool = H1Pool(service, limits, self.metrics)
        cluster = Cluster(service, pool, make_balancer(policy))
        cluster.update(endpoints)
        self.metrics.endpoints.labels(service).set(len(endpoints))
        self.clusters[service] = cluster
        self.discovery.subscribe(service, self._on_update)
        return cluster

    def _on_update(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        cluster = self.clusters.get(service)
        if cluster is not None:
            cluster.update(endpoints)
        self.metrics.endpoints.labels(service).set(len(endpoints))
        self.metrics.discovery_updates.labels(service).inc()

    def snapshot(self) -> dict[str, Any]:
        return {name: cluster.snapshot() for name, cluster in sorted(self.clusters.items())}

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.pool.close()
