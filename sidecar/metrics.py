"""Prometheus metrics of one sidecar, held in a registry passed in (no globals).

The per-call figures (`observe_request()`, `PoolMetrics.stream()`) stay off
prometheus_client's locked values: a call adds to plain counts (sidecar/tallies.py: per
label key, and per histogram bucket with a running sum) that are folded into the
prometheus children when metrics are read. A collector registered ahead of every
metric folds on each `registry.collect()`, so /metrics, /stats and `get_sample_value`
see every call. Under `workers: N` the supervisor reads the workers' multiprocess
files, not their registries, so a worker also folds on a timer while figures are
pending (`fold_every()`) and once more when it closes. The data path and the reads run
on the event loop's thread, so the plain structures need no lock.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from sidecar.filtermetrics import FilterMetrics
from sidecar.tallies import (
    CallLater,
    Calls,
    Cancellable,
    Count,
    FoldOnCollect,
    PendingCounts,
    Tallies,
    fold_histogram,
    new_tally,
)

# Sub-millisecond to seconds: a sidecar hop costs ~0.1 ms, a slow call seconds.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SIZE_BUCKETS = (0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
# Under `workers: N`, the longest a worker's figures wait to reach the supervisor's /metrics.
WORKER_FOLD_SECONDS = 0.5

_RequestKey = tuple[str, str, str, int, str]  # direction, service, method, status, grpc_status
_ServiceKey = tuple[str, str]  # direction, service
_PoolKey = tuple[str, str]  # service, protocol

# A histogram tally is its child's counts per bucket since the last fold (+Inf last),
# then the child's running sum, at these indexes (constants: list[-1] is slower).
_DURATION_SUM = len(DURATION_BUCKETS) + 1
_SIZE_SUM = len(SIZE_BUCKETS) + 1


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        r.register(FoldOnCollect(self.fold))
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
        self.downstream_refused = Counter(
            "opus_downstream_connections_refused",
            "New connections closed at once, by listener and the limit they hit "
            "(max_connections: the listener's; fd_reserve: the process's fd budget).",
            ["listener", "limit"],
            registry=r,
        )
        self.downstream_timeouts = Counter(
            "opus_downstream_timeouts",
            "Connections (HTTP/2: streams, for body) closed by a timeout, by listener and "
            "timeout (preface, header, body, idle).",
            ["listener", "timeout"],
            registry=r,
        )
        self.tls_refused = Counter(
            "opus_tls_refused_connections",
            "mTLS: connections refused, by listener (an inbound one, or upstream for the "
            "pools' handshakes) and reason (plaintext, certificate, no_certificate, "
            "identity, protocol_version, handshake_timeout, handshake).",
            ["listener", "reason"],
            registry=r,
        )
        self.tls_peer_requests = Counter(
            "opus_tls_peer_requests",
            "mTLS inbound: calls by the caller's verified SPIFFE ID (none: plaintext in "
            "permissive mode).",
            ["identity"],
            registry=r,
        )
        self.authz_denied = Counter(
            "opus_authz_denied",
            "Inbound calls the authorization policy denied (403 / PERMISSION_DENIED), by "
            "the DENY rule that matched, or '(no allow rule)' when ALLOW rules exist and "
            "none matched.",
            ["rule"],
            registry=r,
        )
        self.authz_intentions_errors = Counter(
            "opus_authz_intentions_errors",
            "Asks of the Consul agent's intentions (authorization.intentions) that failed: "
            "the agent down, slow past intentions.timeout, or answering nonsense.",
            registry=r,
        )
        self.tls_certificate_expired = Counter(
            "opus_tls_certificate_expired",
            "Times the sidecar's own certificate was found past its not-after with no "
            "new one in hand (alert on any increase).",
            registry=r,
        )
        self.tls_source_errors = Counter(
            "opus_tls_source_errors",
            "Failed queries to a certificate source (and answers that could not be used), "
            "by source; the material in use stays.",
            ["source"],
            registry=r,
        )
        self.upstream_connections = Gauge(
            "opus_upstream_connections",
            "Upstream connections open now, by cluster and protocol.",
            ["service", "protocol"],
            registry=r,
            multiprocess_mode="livesum",  # summed over worker processes
        )
        self.config_reloads = config_reloads_counter(r)
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
        self.route_requests = Counter(
            "opus_route_requests",
            "Outbound calls that matched a route rule, by rule name and the destination "
            "(service and subset; empty: all its endpoints) the rule sent them to.",
            ["route", "service", "subset"],
            registry=r,
        )
        self.faults = Counter(
            "opus_faults_injected",
            "Faults injected by route rules, by rule name and kind (delay or abort).",
            ["route", "kind"],
            registry=r,
        )
        self.mirrors = Counter(
            "opus_mirror_requests",
            "Mirrored copies of calls by rule name and result: sent, failed, timeout, "
            "cancelled, or dropped_* (in_flight, buffered_bytes, body_size, streaming).",
            ["route", "result"],
            registry=r,
        )
        self.buffer_budget_refusals = Counter(
            "opus_buffer_budget_refusals",
            "Calls refused 503 because filters.max_buffered_request_bytes was in use.",
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
        # Filters declare their own metrics (opus_retries, opus_hmac_failures, ...) here.
        self.filters = FilterMetrics(r)
        # requests, request_duration, request_size and response_size are fed only by
        # fold(), which sets the histograms' sums: an observe() elsewhere would be lost.
        self._request_children: dict[_RequestKey, Counter] = {}
        self._histograms: dict[_ServiceKey, tuple[Histogram, Histogram, Histogram]] = {}
        self._tallies: dict[_ServiceKey, Tallies] = {}
        self._pending_calls = PendingCounts[_RequestKey, Calls](self._first_call)
        # PoolMetrics.stream() counts here, per (service, protocol).
        self.pending_streams = PendingCounts[_PoolKey, Count](self._first_stream)
        self._call_later: CallLater | None = None
        self._fold_interval = 0.0
        self._fold_timer: Cancellable | None = None

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
        calls = self._pending_calls[direction, service, grpc_method, status, grpc_status]
        calls.count += 1
        duration, size_in, size_out = calls.tallies
        # bisect_left finds the first bound >= the value, the bucket observe()'s
        # `value <= bound` scan finds; past the last bound, the +Inf bucket.
        duration[bisect_left(DURATION_BUCKETS, seconds)] += 1
        duration[_DURATION_SUM] += seconds
        size_in[bisect_left(SIZE_BUCKETS, bytes_in)] += 1
        size_in[_SIZE_SUM] += bytes_in
        size_out[bisect_left(SIZE_BUCKETS, bytes_out)] += 1
        size_out[_SIZE_SUM] += bytes_out

    def fold(self) -> None:
        """Add what was counted since the last fold to the prometheus children."""
        pending = self._pending_calls
        if pending:
            services: set[_ServiceKey] = set()
            for key, calls in pending.items():
                self._request_children[key].inc(calls.count)
                services.add((key[0], key[1]))
            pending.clear()
            for skey in services:
                for tally, child in zip(self._tallies[skey], self._histograms[skey], strict=True):
                    fold_histogram(tally, child)
        streams = self.pending_streams
        if streams:
            for labels, streamed in streams.items():
                self.upstream_streams.labels(*labels).inc(streamed.count)
            streams.clear()

    def fold_every(self, interval: float, call_later: CallLater) -> None:
        """Fold at most `interval` seconds after figures start pending, until close():
        for multiprocess mode, where the supervisor reads this process's files."""
        self._call_later = call_later
        self._fold_interval = interval
        if self._pending_calls or self.pending_streams:
            self._arm()

    def close(self) -> None:
        """Stop the fold timer and fold what is pending."""
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        self._call_later = None
        self.fold()

    def _arm(self) -> None:
        if self._call_later is not None and self._fold_timer is None:
            self._fold_timer = self._call_later(self._fold_interval, self._fold_on_timer)

    def _fold_on_timer(self) -> None:
        self._fold_timer = None
        # fold() empties the pending entries, so the next call misses and re-arms.
        self.fold()

    def _first_call(self, key: _RequestKey) -> Calls:
        """A request-counter key's first call since the last fold."""
        direction, service, method, status, grpc_status = key
        if key not in self._request_children:
            # Made at the key's first call, as .labels() on each call would have: the
            # series' _created time stays that call's.
            self._request_children[key] = self.requests.labels(
                direction, service, method, str(status), grpc_status
            )
        tallies = self._tallies.get((direction, service))
        if tallies is None:
            tallies = self._new_tallies(direction, service)
        self._arm()
        return Calls(tallies)

    def _first_stream(self, key: _PoolKey) -> Count:
        self._arm()
        return Count()

    def _new_tallies(self, direction: str, service: str) -> Tallies:
        children = (
            self.request_duration.labels(direction, service),
            self.request_size.labels(direction, service),
            self.response_size.labels(direction, service),
        )
        tallies = (new_tally(children[0]), new_tally(children[1]), new_tally(children[2]))
        self._histograms[direction, service] = children
        self._tallies[direction, service] = tallies
        return tallies


def config_reloads_counter(registry: CollectorRegistry) -> Counter:
    """`opus_config_reloads_total{result}`: the sidecar's, or under `workers: N` the
    supervisor's (one count per reload of the pod, not one per worker)."""
    return Counter(
        "opus_config_reloads",
        "Config reloads by result: ok (applied, or nothing to change), invalid (did not "
        "parse or validate), refused (valid, but changes what needs a restart).",
        ["result"],
        registry=registry,
    )
