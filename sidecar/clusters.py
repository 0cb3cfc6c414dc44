"""The outbound clusters: one per service, made on first use from its ClusterSettings
(the pool by protocol, with mTLS when it is on; the balancer; outlier detection and
health checks), fed by discovery's updates, and replaced by a reload only when its
settings change (a kept cluster keeps its pooled connections)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from sidecar.cluster import Cluster
from sidecar.config import (
    ClusterSettings,
    SidecarConfig,
    cluster_settings,
)
from sidecar.discovery.base import Discovery, Endpoint
from sidecar.lb import make_balancer
from sidecar.metrics import Metrics
from sidecar.tls.upstream import UpstreamTls
from sidecar.upstream.h1pool import H1Pool
from sidecar.upstream.h2pool import H2Pool
from sidecar.upstream.pool import Pool, PoolLimits


def pool_limits(cfg: SidecarConfig, service: str) -> PoolLimits:
    return _limits(cluster_settings(cfg, service))


def _limits(settings: ClusterSettings) -> PoolLimits:
    return PoolLimits(
        max_connections=settings.max_connections,
        max_per_route=settings.max_per_route,
        idle_timeout=settings.idle_timeout,
        connect_timeout=settings.connect_timeout,
        pending_timeout=settings.pending_timeout,
        keepalive_interval=settings.keepalive_interval,
        keepalive_timeout=settings.keepalive_timeout,
    )


@runtime_checkable
class ReportsToMetrics(Protocol):
    """A discovery backend that counts its own errors and staleness (the remote ones)."""

    def bind_metrics(self, metrics: Metrics) -> None: ...


class ClusterManager:
    """One cluster per service the local app calls, created on first use."""

    def __init__(
        self,
        cfg: SidecarConfig,
        discovery: Discovery,
        metrics: Metrics,
        tls: UpstreamTls | None = None,
    ) -> None:
        self.cfg = cfg
        self.discovery = discovery
        self.metrics = metrics
        self.tls = tls  # mTLS to peer sidecars; None: plaintext (tls.mode: disable)
        self.clusters: dict[str, Cluster] = {}
        # The manager is where discovery meets the metrics registry (it already turns
        # endpoint updates into gauges), so it hands the registry to the backend too.
        if isinstance(discovery, ReportsToMetrics):
            discovery.bind_metrics(metrics)

    def _endpoint_at(self, service: str) -> Callable[[str, int], Endpoint]:
        def endpoint_at(host: str, port: int) -> Endpoint:
            cluster = self.clusters.get(service)
            for endpoint in cluster.endpoints if cluster is not None else ():
                if endpoint.host == host and endpoint.port == port:
                    return endpoint
            return Endpoint(host, port)

        return endpoint_at

    def knows(self, service: str) -> bool:
        return service in self.clusters or service in self.discovery.services()

    def get(self, service: str) -> Cluster | None:
        cluster = self.clusters.get(service)
        if cluster is not None:
            return cluster
        endpoints = self.discovery.endpoints(service)
        if endpoints is None:
            return None
        cluster = self._build(service, cluster_settings(self.cfg, service))
        if endpoints:
            cluster.update(endpoints)
        self.metrics.endpoints.labels(service).set(len(endpoints))
        self.clusters[service] = cluster
        self.discovery.subscribe(service, self._on_update)
        # A backend that starts its watch on first use may have answered already.
        latest = self.discovery.endpoints(service)
        if latest:
            cluster.update(latest)
        cluster.start()
        return cluster

    def _build(self, service: str, settings: ClusterSettings) -> Cluster:
        limits = _limits(settings)
        pool: Pool
        if settings.protocol == "h2c":
            pool = H2Pool(service, limits, self.metrics, tls=self.tls)
        else:
            connect = None
            if self.tls is not None:
                connect = self.tls.h1_connect(service, self._endpoint_at(service))
            pool = H1Pool(
                service,
                limits,
                self.metrics,
                connect=connect,
                max_header_bytes=settings.max_header_bytes,
            )
        health_check = settings.health_check
        probe = None
        if self.tls is not None and health_check.enabled:  # the peers take mTLS only
            probe = self.tls.health_probe(service, health_check.path, health_check.timeout)
        return Cluster(
            service,
            pool,
            make_balancer(settings.lb_policy),
            zone=settings.zone,
            hash_header=settings.hash_header,
            outlier=settings.outlier,
            health_check=health_check,
            metrics=self.metrics,
            resend_unavailable=True,
            probe=probe,
        )

    def reconfigure(self, cfg: SidecarConfig) -> list[Cluster]:
        """Take a reloaded config: a cluster whose settings are unchanged is kept (and its
        pooled connections with it); any other is replaced by a new one with the same
        endpoints. Returns the replaced clusters, for the caller to close once the calls
        in flight on them are done."""
        retired: list[Cluster] = []
        for service, old in list(self.clusters.items()):
            settings = cluster_settings(cfg, service)
            if settings == cluster_settings(self.cfg, service):
                continue
            cluster = self._build(service, settings)
            if old.endpoints:
                cluster.update(old.endpoints)
            self.clusters[service] = cluster  # discovery's updates find it by name
            cluster.start()
            retired.append(old)
        self.cfg = cfg
        return retired

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
            cluster.close()
