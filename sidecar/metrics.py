"""Prometheus metrics of one sidecar, held in a registry passed in (no globals).

The data path calls `observe_request()` once per call; the labelled children it
needs are cached so a call costs two dictionary look-ups and two updates.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics import MetricWrapperBase

# Sub-millisecond to seconds: a sidecar hop costs ~0.1 ms, a slow call seconds.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SIZE_BUCKETS = (0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "opus_requests",
            "Calls handled, by direction (outbound: from the local app; inbound: from a peer), "
            "target service, gRPC method (pkg.Service/Method; empty for plain HTTP), HTTP "
            "status code and gRPC status (empty for plain HTTP).",
            ["direction", "service", "method", "code", "grpc_status"],
            registry=r,
        )
        self.request_size = Histogram(
            "opus_request_size_bytes",
            "Request body bytes received from the caller, by direction and service.",
            ["direction", "service"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.response_size = Histogram(
            "opus_response_size_bytes",
            "Response body bytes sent to the caller, by direction and service.",
            ["direction", "service"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.streams_per_connection = Histogram(
            "opus_upstream_streams_per_connection",
            "Requests an upstream connection carried in its life (observed when it closes).",
            ["service", "protocol"],
            buckets=(1, 2, 5, 10, 100, 1000, 10_000, 100_000, 1_000_000),
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.request_duration = Histogram(
            "opus_request_duration_seconds",
            "Time from the request's headers to the end of the response, by direction and service.",
            ["direction", "service"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.downstream_connections = Counter(
            "opus_downstream_connections_opened",
            "Connections accepted from callers, by listener (outbound: the local app; "
            "inbound: peer sidecars).",
            ["listener"],
            registry=r,
        )
        self.upstream_connections = Gauge(
            "opus_upstream_connections",
            "Upstream connections open now, by cluster and protocol.",
            ["service", "protocol"],
            registry=r,
            multiprocess_mode="livesum",  # summed over worker processes
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
            multiprocess_mode="max",  # every worker sees the same set
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
        # Resilience filters (filters/retry.py, timeout.py, rate_limit.py, circuit_breaker.py).
        self.retries = Counter(
            "opus_retries", "Retries sent by the retry filter, by service.", ["service"], registry=r
        )
        self.retry_budget_exhausted = Counter(
            "opus_retry_budget_exhausted",
            "Retries the retry budget refused (the last response was returned), by service.",
            ["service"],
            registry=r,
        )
        self.timeouts = Counter(
            "opus_timeouts",
            "Calls or tries cut off by a timeout, by service and kind (overall or per_try).",
            ["service", "kind"],
            registry=r,
        )
        self.rate_limited = Counter(
            "opus_rate_limited",
            "Calls answered 429 by rate_limit, by service.",
            ["service"],
            registry=r,
        )
        self.circuit_open = Counter(
            "opus_circuit_open",
            "Times a circuit breaker opened, by service and reason "
            "(consecutive_failures or probe_failed).",
            ["service", "reason"],
            registry=r,
        )
        self.discovery_errors = Counter(
            "opus_discovery_errors",
            "Failed registry requests (watches, registration, heartbeats), by backend.",
            ["backend"],
            registry=r,
        )
        self.discovery_stale = Gauge(
            "opus_discovery_stale",
            "1 while the registry is unreachable and calls route on the last endpoints known.",
            ["backend"],
            registry=r,
            multiprocess_mode="max",
        )
        self.endpoint_ejections = Counter(
            "opus_endpoint_ejections",
            "Endpoints ejected by outlier detection, by service.",
            ["service"],
            registry=r,
        )
        self.endpoints_health = Gauge(
            "opus_endpoints_health",
            "Endpoints per service by health: healthy, ejected (outlier detection), "
            "unhealthy (active health checks).",
            ["service", "health"],
            registry=r,
            multiprocess_mode="max",
        )
        # Transparent capture (sidecar/capture.py).
        self.capture_connections = Counter(
            "opus_capture_connections",
            "Connections taken by the capture listener, by kind: meshed (HTTP to a known "
            "service), passthrough (relayed to the original destination), opaque (an opaque "
            "port, relayed unsniffed).",
            ["kind"],
            registry=r,
        )
        self.capture_bytes = Counter(
            "opus_capture_bytes",
            "Bytes relayed by the capture listener, by direction: upstream (app to the "
            "original destination), downstream (back to the app).",
            ["direction"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str, int, str], MetricWrapperBase] = {}
        self._per_service: dict[tuple[str, str], tuple[MetricWrapperBase, ...]] = {}

    def observe_request(
        self,
        direction: str,
        service: str,
        status: int,
        seconds: float,
        grpc_method: str = "",
        grpc_status: str = "",
        bytes_in: int = 0,
        bytes_out: int = 0,
    ) -> None:
        key = (direction, service, grpc_method, status, grpc_status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self.requests.labels(
                direction, service, grpc_method, str(status), grpc_status
            )
            self._request_children[key] = counter
        counter.inc()  # type: ignore[attr-defined]
        skey = (direction, service)
        children = self._per_service.get(skey)
        if children is None:
            children = (
                self.request_duration.labels(direction, service),
                self.request_size.labels(direction, service),
                self.response_size.labels(direction, service),
            )
            self._per_service[skey] = children
        duration, size_in, size_out = children
        duration.observe(seconds)  # type: ignore[attr-defined]
        size_in.observe(bytes_in)  # type: ignore[attr-defined]
        size_out.observe(bytes_out)  # type: ignore[attr-defined]
