"""The schema of traffic management (docs/traffic.md): route rules, their match, their
destinations (services and subsets, weighted) and their per-route policies (timeout,
retry, header rewrites, filters, fault injection, mirroring).

Rules apply at two levels: `route_rules` (the outbound listener's, tried first on every
call) and `services.<name>.route_rules` (calls resolved to that service). First match wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One filter in a chain: a registered name and its own config (validated by the filter)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)


RetryCondition = Literal[
    "connect-failure",
    "refused-stream",
    "reset",
    "retriable-status-codes",
    "per-try-timeout",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
]


@dataclass(frozen=True, slots=True)
class PathMatch:
    """Exactly one of the three."""

    exact: str = ""
    prefix: str = ""
    regex: str = ""  # matched against the whole path, query excluded


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A request header: `name` and exactly one of exact, prefix, regex, present, absent."""

    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None  # the whole value
    present: bool = False
    absent: bool = False


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """A query parameter: `name` and exactly one of exact, regex, present."""

    name: str
    exact: str | None = None
    regex: str | None = None
    present: bool = False


@dataclass(frozen=True, slots=True)
class GrpcMatch:
    """A gRPC call (content-type application/grpc) to `service` (pkg.Service), and
    `method` of it when given."""

    service: str = ""
    method: str = ""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Every condition given must hold; an empty match matches every call."""

    path: PathMatch | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    grpc: GrpcMatch | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """A service (empty in `services.<name>.route_rules`: that service), optionally one
    of its subsets (`services.<service>.subsets`), with a relative weight."""

    service: str = ""
    subset: str = ""
    weight: int | None = None  # needed when a rule has more than one destination


@dataclass(frozen=True, slots=True)
class RouteRetry:
    """The route's retry policy, run by the `retry` filter (filters/retry.py)."""

    attempts: int = 2  # retries after the first try (Istio's `attempts`)
    per_try_timeout: float | None = None
    retry_on: tuple[RetryCondition, ...] = (
        "connect-failure",
        "refused-stream",
        "reset",
        "retriable-status-codes",
        "unavailable",
        "per-try-timeout",
    )
    retriable_status_codes: tuple[int, ...] = (502, 503, 504)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed: float  # seconds
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """At least one of the two: gRPC calls get grpc_status (else http_status as gRPC maps
    it), other calls http_status (else the HTTP status grpc_status stands for)."""

    http_status: int | None = None
    grpc_status: int | None = None
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    # Only calls carrying this request header (any value) are faulted; empty: every call.
    header: str = ""


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """A share of calls also sent to another service or subset; the reply is discarded."""

    service: str
    subset: str = ""
    percent: float = 100.0
    max_in_flight: int = 32  # mirrored calls under way at once (this rule); more: dropped
    max_body_bytes: int = 65536  # a call whose body is larger (or still streaming): not mirrored
    max_buffered_bytes: int = 1024 * 1024  # bodies all in-flight copies hold together
    timeout: float = 5.0  # a mirrored call still unanswered after this is abandoned


@dataclass(frozen=True, slots=True)
class RouteRule:
    name: str  # in the access log's `route` and the route metrics' label
    match: RouteMatch = RouteMatch()
    # None or empty: where the call would go anyway (the listener level: as routed without
    # rules; a service's rules: that service, all its endpoints).
    destinations: tuple[Destination, ...] = ()
    timeout: float | None = None  # the whole call, retries included (the `timeout` filter)
    retry: RouteRetry | None = None
    headers: dict[str, Any] | None = None  # the `headers` filter's config
    # Replaces the service's (or the listener's) chain for calls on this rule; None: kept.
    filters: tuple[FilterSpec, ...] | None = None
    fault: FaultConfig | None = None
    mirror: MirrorConfig | None = None

    def policy_filters(self) -> tuple[tuple[str, FilterSpec], ...]:
        """The built-in filters the rule's own keys stand for, outermost first, each with
        the key it comes from: the timeout spans the retries, which each pass the header
        rewrites (and the chain's filters) again."""
        specs: list[tuple[str, FilterSpec]] = []
        if self.timeout is not None:
            specs.append(("timeout", FilterSpec("timeout", {"timeout": self.timeout})))
        if self.retry is not None:
            retry = self.retry
            config: dict[str, Any] = {
                "max_retries": retry.attempts,
                "retry_on": list(retry.retry_on),
                "retriable_status_codes": list(retry.retriable_status_codes),
            }
            if retry.per_try_timeout is not None:
                config["per_try_timeout"] = retry.per_try_timeout
            specs.append(("retry", FilterSpec("retry", config)))
        if self.headers is not None:
            specs.append(("headers", FilterSpec("headers", dict(self.headers))))
        return tuple(specs)
