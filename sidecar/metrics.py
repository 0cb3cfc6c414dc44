"""Prometheus metrics of one sidecar, held in a registry passed in (no globals).

The data path calls `observe_request()` once per call; the labelled children it
needs are cached so a call costs two dictionary look-ups and two updates.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

# Sub-millisecond to seconds: a sidecar hop costs ~0.1 ms, a slow call seconds.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "opus_requests",
            "Calls handled, by direction (outbound: from the local app; inbound: from a peer), "
            "target service and HTTP status code.",
            ["direction", "service", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "opus_request_duration_seconds",
            "Time from the request's headers to the end of the response, by direction and service.",
            ["direction", "service"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_connections = Gauge(
            "opus_upstream_connections",
            "Upstream connections open now, by cluster and protocol.",
            ["service", "protocol"],
            registry=r,
        )
        self.upstream_connections_opened = Counter(
            "opus_upstream_connections_opened",
            "Upstream connections opened, by cluster and protocol.",
            ["service", "protocol"],
            registry=r,
        )
        self.upstream_connections_closed = Counter(
            "opus_upstream_connections_closed",
            "Upstream connections closed, by cluster and protocol.",
            ["service", "protocol"],
            registry=r,
        )
        self.upstream_streams = Counter(
            "opus_upstream_streams",
            "Requests sent upstream (HTTP/2 streams or HTTP/1.1 exchanges), by cluster.",
            ["service", "protocol"],
            registry=r,
        )
        self.endpoints = Gauge(
            "opus_endpoints",
            "Healthy endpoints known per service.",
            ["service"],
            registry=r,
        )
        self.discovery_updates = Counter(
            "opus_discovery_updates",
            "Endpoint-set changes delivered by discovery, by service.",
            ["service"],
            registry=r,
        )
        self.filter_errors = Counter(
            "opus_filter_errors",
            "Calls a filter failed (raised), answered 500, by filter.",
            ["filter"],
            registry=r,
        )
        self.local_replies = Counter(
            "opus_local_replies",
            "Calls answered by the mesh itself rather than the upstream, by filter (or 'router') "
            "and status code.",
            ["filter", "code"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int], MetricWrapperBase] = {}
        self._duration_children: dict[tuple[str, str], MetricWrapperBase] = {}

    def observe_request(self, direction: str, service: str, status: int, seconds: float) -> None:
        key = (direction, service, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self.requests.labels(direction, service, str(status))
            self._request_children[key] = counter
        counter.inc()  # type: ignore[attr-defined]
        dkey = (direction, service)
        hist = self._duration_children.get(dkey)
        if hist is None:
            hist = self.request_duration.labels(direction, service)
            self._duration_children[dkey] = hist
        hist.observe(seconds)  # type: ignore[attr-defined]
