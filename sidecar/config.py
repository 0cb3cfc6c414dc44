"""The sidecar's configuration: typed, frozen objects parsed once at start.

Owns the schema (the dataclasses below), YAML loading, `OPUS_*` environment
overrides and validation. Every error names the key it is about and is raised
before any port is bound.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import re
import socket
import tempfile
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
AppProtocol = Literal["http1", "h2c"]
UpstreamProtocol = Literal["h2c", "http1"]
LbPolicy = Literal["round_robin", "least_request", "ring_hash"]
DiscoveryBackend = Literal["file", "static", "consul", "nacos", "kubernetes"]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The local app's identity in the mesh."""

    name: str = "app"
    instance_id: str = ""  # empty: "{name}-{hostname}-{pid}"
    zone: str = ""
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppConfig:
    """Where the inbound listener hands calls to the local app."""

    host: str = "127.0.0.1"
    port: int = 8000
    protocol: AppProtocol = "http1"
    health_path: str = "/health"
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class CaptureListenerConfig:
    """Where iptables REDIRECTs the app's outbound TCP (docs/transparent.md)."""

    # REDIRECT rewrites the destination to 127.0.0.1 for the pod's own traffic and to the
    # incoming interface's address otherwise, so this binds every address; off by default.
    host: str = "0.0.0.0"
    port: int = 15001
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    outbound: ListenerConfig = ListenerConfig("127.0.0.1", 8080)
    inbound: ListenerConfig = ListenerConfig("0.0.0.0", 15006)
    admin: ListenerConfig = ListenerConfig("0.0.0.0", 9090)
    capture: CaptureListenerConfig = CaptureListenerConfig()
    # The address other sidecars use to reach this sidecar's inbound listener.
    # Empty: the inbound host when it is a concrete address, else 127.0.0.1.
    advertise_host: str = ""


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    host: str
    port: int
    zone: str = ""
    weight: int = 1


@dataclass(frozen=True, slots=True)
class FileDiscoveryConfig:
    directory: str = ""  # empty: "$TMPDIR/opus-mesh/registry"
    heartbeat_interval: float = 0.25
    ttl: float = 1.0
    poll_interval: float = 0.2


@dataclass(frozen=True, slots=True)
class StaticDiscoveryConfig:
    services: dict[str, tuple[StaticEndpoint, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsulDiscoveryConfig:
    """Consul through its HTTP API (docs/discovery.md)."""

    address: str = ""  # empty: $CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    token: str = ""  # empty: $CONSUL_HTTP_TOKEN, if set
    datacenters: dict[str, str] = field(default_factory=dict)  # service -> its dc
    # Tried in order when a service's own dc has no passing instance.
    failover_datacenters: tuple[str, ...] = ()
    # Watched from start (start() waits for them); others are watched on first use.
    watch: tuple[str, ...] = ()
    wait: float = 30.0  # blocking-query wait, seconds
    max_queries_per_second: float = 10.0  # per watch; the loop's token bucket (burst 2)
    retry_max: float = 2.0  # longest back-off between failed queries, seconds
    request_timeout: float = 2.0  # non-blocking calls (register, check updates)
    ttl: float = 3.0  # the registered TTL check's TTL
    check_interval: float = 1.0  # probe the app and refresh the TTL check this often
    check_timeout: float = 0.5  # the app probe's timeout
    deregister_critical_after: float = 60.0  # Consul's minimum is 1 minute


@dataclass(frozen=True, slots=True)
class NacosDiscoveryConfig:
    """Nacos through its v2 HTTP Open API, falling back to v1 (docs/discovery.md)."""

    address: str = ""  # empty: $NACOS_ADDR, else http://127.0.0.1:8848
    namespace: str = ""  # namespaceId; empty: the public namespace
    group: str = "DEFAULT_GROUP"
    cluster: str = "DEFAULT"
    api: Literal["auto", "v2", "v1"] = "auto"  # auto: v2, then v1 on a 404
    beat_interval: float = 5.0
    poll_interval: float = 1.0
    watch: tuple[str, ...] = ()
    request_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Headless Services through cluster DNS (docs/discovery.md)."""

    namespace: str = ""  # empty: the pod's namespace (service account file), else "default"
    cluster_domain: str = "cluster.local"
    port: int = 15006  # the peers' inbound port (every sidecar listens on the same one)
    resolve_interval: float = 1.0
    resolve_timeout: float = 1.0
    watch: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    backend: DiscoveryBackend = "file"
    register: bool = True  # register the local app as an instance of service.name
    file: FileDiscoveryConfig = FileDiscoveryConfig()
    static: StaticDiscoveryConfig = StaticDiscoveryConfig()
    consul: ConsulDiscoveryConfig = ConsulDiscoveryConfig()
    nacos: NacosDiscoveryConfig = NacosDiscoveryConfig()
    kubernetes: KubernetesDiscoveryConfig = KubernetesDiscoveryConfig()


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checks: GET `path` on every endpoint (a peer's inbound, so its app)."""

    enabled: bool = False
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 1  # consecutive passes to return to rotation
    unhealthy_threshold: int = 2  # consecutive failures to leave it


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive outlier detection on the calls the cluster sends (Envoy's semantics)."""

    enabled: bool = True
    consecutive_5xx: int = 5  # 5xx replies or connect failures in a row
    consecutive_connect_failures: int = 3  # connect failures alone in a row
    base_ejection_time: float = 30.0  # x times ejected
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Sidecar-to-sidecar transport (the seed's connection-pool table)."""

    protocol: UpstreamProtocol = "h2c"
    max_connections: int = 20
    max_per_route: int = 5
    idle_timeout: float = 30.0
    connect_timeout: float = 1.0
    # How long a call waits for a free stream slot when every allowed connection is full.
    pending_timeout: float = 1.0
    # HTTP/2 PING on a connection quiet this long; no ACK within keepalive_timeout:
    # the peer is dead, the connection is dropped and replaced. 0 turns it off.
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 5.0
    lb_policy: LbPolicy = "round_robin"
    hash_header: str = ""  # ring_hash: the header whose value picks the endpoint
    zone_aware: bool = True  # prefer healthy endpoints in service.zone
    health_check: HealthCheckConfig = HealthCheckConfig()
    outlier: OutlierConfig = OutlierConfig()


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One filter in a chain: a registered name and its own config (validated by the filter)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FiltersConfig:
    """Filter chains per listener; calls pass them in order, responses in reverse."""

    outbound: tuple[FilterSpec, ...] = ()
    inbound: tuple[FilterSpec, ...] = ()
    # The most a filter may buffer of a body it asks to read whole; over it: 413.
    max_body_bytes: int = 1024 * 1024
    # The most request body bytes all calls together hold buffered (per process); over: 503.
    max_buffered_request_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClusterOverride:
    """Per-service overrides of the upstream defaults."""

    lb_policy: LbPolicy | None = None
    hash_header: str | None = None
    max_connections: int | None = None
    max_per_route: int | None = None
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig | None = None
    # Replaces filters.outbound for calls to this service.
    filters: tuple[FilterSpec, ...] | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """An explicit outbound route: a path prefix or a gRPC service name to a service."""

    service: str
    prefix: str = ""
    grpc_service: str = ""
    # Replaces the service's (or the listener's) outbound chain for calls on this route.
    filters: tuple[FilterSpec, ...] | None = None


@dataclass(frozen=True, slots=True)
class Http2ServerConfig:
    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    max_frame_size: int = 16384


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    # HTTP/1.1: from a request's first byte to the end of its head (nginx client_header_timeout).
    header_read_timeout: float = 10.0
    # From accept until the protocol is known and, for HTTP/2, the client's preface and
    # SETTINGS are in (Envoy's listener_filters_timeout: 15 s).
    preface_timeout: float = 10.0
    # A connection with no call in progress (HTTP/1.1 keep-alive, HTTP/2 with no open
    # stream) is closed after this long; HTTP/2 gets a GOAWAY first (nginx: 75 s).
    idle_timeout: float = 60.0
    # Longest wait for the next byte of a request body we are reading (nginx
    # client_body_timeout: 60 s); then the call is abandoned and the connection closed.
    body_read_timeout: float = 30.0
    # Open downstream connections per listener; beyond it a new one is closed at once.
    max_connections: int = 10000
    # File descriptors kept back from downstream connections for everything else (pooled
    # upstream connections, admin, the registry heartbeat, logs): accepting stops while
    # open downstream connections + fds open at start + this reach RLIMIT_NOFILE.
    fd_reserve: int = 128


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Transparent interception on listeners.capture (docs/transparent.md)."""

    # How long a connection may stay silent before it is relayed unsniffed: server-first
    # protocols (MySQL, SMTP) send nothing until the server speaks. Linkerd waits 10 s.
    detect_timeout: float = 0.2
    # Relayed at once, never sniffed (Linkerd's default opaque ports).
    opaque_ports: tuple[int, ...] = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)
    # Original destination ("ip:port" or "ip") -> the service it stands for (a VIP, say).
    service_ips: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 1.0  # passthrough: dialling the original destination


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = "INFO"
    # "-": stdout; "": off; anything else: a file path (appended).
    access_log: str = "-"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    service: ServiceConfig = ServiceConfig()
    app: AppConfig = AppConfig()
    listeners: ListenersConfig = ListenersConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    services: dict[str, ClusterOverride] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    filters: FiltersConfig = FiltersConfig()
    http2: Http2ServerConfig = Http2ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    drain_timeout: float = 10.0
    # Worker processes, each with its own event loop, sharing the listeners' ports
    # through SO_REUSEPORT; a supervisor serves the admin port with metrics summed.
    workers: int = 1
    capture: CaptureConfig = CaptureConfig()


# --- Errors -----------------------------------------------------------------


class ConfigError(Exception):
    """A bad config value, named by its dotted key (`routes[1].service`).

    `path` is the config file the value came from and `env_var` the environment
    variable that set it, when known, so the message points at what to edit.
    """

    def __init__(self, key: str, message: str, *, path: str = "", env_var: str = "") -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message
        self.path = path
        self.env_var = env_var

    def __str__(self) -> str:
        text = self.message
        if self.key:
            origin = f" (from {self.env_var})" if self.env_var else ""
            text = f"config key '{self.key}'{origin}: {text}"
        if self.path and not self.env_var:
            text = f"{self.path}: {text}"
        return text


# --- Value rules the types cannot express -------------------------------------


@dataclass(frozen=True, slots=True)
class _Bound:
    low: float
    high: float | None = None
    low_open: bool = False  # "> low" rather than ">= low"

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is not None:
            return f" in {_num(self.low)}..{_num(self.high)}"
        return f" {'>' if self.low_open else '>='} {_num(self.low)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_PORT = _Bound(0, 65535)  # 0: the OS picks a free port (tests read it back)
_AT_LEAST_ONE = _Bound(1)
_POSITIVE = _Bound(0, low_open=True)

# Keyed by (dataclass, field) rather than dotted path so that every instance of a
# type (each listener, each per-service override) gets the same rule.
_BOUNDS: dict[tuple[type, str], _Bound] = {
    (AppConfig, "port"): _PORT,
    (AppConfig, "max_connections"): _AT_LEAST_ONE,
    (ListenerConfig, "port"): _PORT,
    (CaptureListenerConfig, "port"): _PORT,
    (CaptureConfig, "detect_timeout"): _POSITIVE,
    (CaptureConfig, "connect_timeout"): _POSITIVE,
    (StaticEndpoint, "port"): _Bound(1, 65535),  # a peer's port must be concrete
    (StaticEndpoint, "weight"): _AT_LEAST_ONE,
    (FileDiscoveryConfig, "heartbeat_interval"): _POSITIVE,
    (FileDiscoveryConfig, "ttl"): _POSITIVE,
    (FileDiscoveryConfig, "poll_interval"): _POSITIVE,
    (ConsulDiscoveryConfig, "wait"): _Bound(1, 600),  # Consul caps wait at 10 minutes
    (ConsulDiscoveryConfig, "max_queries_per_second"): _POSITIVE,
    (ConsulDiscoveryConfig, "retry_max"): _POSITIVE,
    (ConsulDiscoveryConfig, "request_timeout"): _POSITIVE,
    (ConsulDiscoveryConfig, "ttl"): _Bound(1),
    (ConsulDiscoveryConfig, "check_interval"): _Bound(0.05),
    (ConsulDiscoveryConfig, "check_timeout"): _POSITIVE,
    (ConsulDiscoveryConfig, "deregister_critical_after"): _Bound(60),
    (NacosDiscoveryConfig, "beat_interval"): _Bound(1),
    (NacosDiscoveryConfig, "poll_interval"): _Bound(0.05),
    (NacosDiscoveryConfig, "request_timeout"): _POSITIVE,
    (KubernetesDiscoveryConfig, "port"): _Bound(1, 65535),
    (KubernetesDiscoveryConfig, "resolve_interval"): _Bound(0.05),
    (KubernetesDiscoveryConfig, "resolve_timeout"): _POSITIVE,
    (HealthCheckConfig, "interval"): _Bound(0.05),
    (HealthCheckConfig, "timeout"): _POSITIVE,
    (HealthCheckConfig, "healthy_threshold"): _AT_LEAST_ONE,
    (HealthCheckConfig, "unhealthy_threshold"): _AT_LEAST_ONE,
    (OutlierConfig, "consecutive_5xx"): _AT_LEAST_ONE,
    (OutlierConfig, "consecutive_connect_failures"): _AT_LEAST_ONE,
    (OutlierConfig, "base_ejection_time"): _POSITIVE,
    (OutlierConfig, "max_ejection_time"): _POSITIVE,
    (OutlierConfig, "max_ejection_percent"): _Bound(0, 100),
    (UpstreamConfig, "max_connections"): _AT_LEAST_ONE,
    (UpstreamConfig, "max_per_route"): _AT_LEAST_ONE,
    (UpstreamConfig, "idle_timeout"): _POSITIVE,
    (UpstreamConfig, "connect_timeout"): _POSITIVE,
    (UpstreamConfig, "pending_timeout"): _POSITIVE,
    (ClusterOverride, "max_connections"): _AT_LEAST_ONE,
    (ClusterOverride, "max_per_route"): _AT_LEAST_ONE,
    # RFC 9113 section 6.5.2 limits for the SETTINGS values.
    (Http2ServerConfig, "max_concurrent_streams"): _AT_LEAST_ONE,
    (FiltersConfig, "max_body_bytes"): _AT_LEAST_ONE,
    (FiltersConfig, "max_buffered_request_bytes"): _AT_LEAST_ONE,
    (SidecarConfig, "workers"): _Bound(1, 64),
    (Http2ServerConfig, "initial_window_size"): _Bound(0, 2**31 - 1),
    (Http2ServerConfig, "max_frame_size"): _Bound(16384, 2**24 - 1),
    (LimitsConfig, "max_request_line"): _AT_LEAST_ONE,
    (LimitsConfig, "max_header_bytes"): _AT_LEAST_ONE,
    (LimitsConfig, "header_read_timeout"): _POSITIVE,
    (LimitsConfig, "preface_timeout"): _POSITIVE,
    (LimitsConfig, "idle_timeout"): _POSITIVE,
    (LimitsConfig, "body_read_timeout"): _POSITIVE,
    (LimitsConfig, "max_connections"): _AT_LEAST_ONE,
    (LimitsConfig, "fd_reserve"): _Bound(0),
    (SidecarConfig, "drain_timeout"): _Bound(0),  # 0: close at once, no drain
}

# Applied to a raw value before its type check, so `level: debug` is accepted.
_NORMALIZE: dict[tuple[type, str], Callable[[str], str]] = {
    (LogConfig, "level"): str.upper,
}

_SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


# --- Building the dataclasses from plain data -----------------------------------

_T = TypeVar("_T")


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _show(value: object) -> str:
    # The input is YAML, so echo YAML's spellings for the values Python spells differently.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type[_T], raw: object, key: str, base: object = None) -> _T:
    """Build `cls` from a mapping; keys it leaves out come from `base`, else the defaults.

    `base` is the parent field's default instance, so `listeners: {inbound: {port: 0}}`
    keeps the inbound default host rather than demanding one.
    """
    if raw is None:  # an empty section (`log:` with nothing under it) means defaults
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mapping, got {_show(raw)}")
    schema: Any = cls  # for the dataclass helpers, which type[_T] does not satisfy
    hints = _hints(schema)
    for name in raw:
        if name not in hints:
            raise ConfigError(_join(key, str(name)), _unknown_key_message(str(name), list(hints)))
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(schema):
        default = _default(f, base)
        if f.name in raw:
            value = raw[f.name]
            normalize = _NORMALIZE.get((cls, f.name))
            if normalize is not None and isinstance(value, str):
                value = normalize(value)
            bound = _BOUNDS.get((cls, f.name))
            kwargs[f.name] = _convert(hints[f.name], value, _join(key, f.name), bound, default)
        elif default is dataclasses.MISSING:
            raise ConfigError(_join(key, f.name), "is required")
        else:
            kwargs[f.name] = default
    return cls(**kwargs)


def _default(f: dataclasses.Field[Any], base: object) -> object:
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unknown_key_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key; known keys: {', '.join(known)}"


def _convert(
    tp: Any, value: object, key: str, bound: _Bound | None = None, default: object = None
) -> object:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _convert(inner, value, key, bound)
    if origin is Literal:
        # `in` alone would let `true` through for a `1` choice (True == 1).
        if any(type(value) is type(a) and value == a for a in args):
            return value
        choices = ", ".join(_show(a) for a in args)
        raise ConfigError(key, f"must be one of {choices}, got {_show(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {_show(value)}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {_show(value)}")
        out: dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key, f"keys must be strings, got {_show(k)}")
            out[k] = _convert(args[1], v, _join(key, k))
        return out
    if tp is Any:  # a filter's own config: the filter's factory validates it
        return value
    if tp is StaticEndpoint and isinstance(value, str):
        return _parse_endpoint(value, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key, default if isinstance(default, tp) else None)
    if tp is bool:
        # YAML already turned true/false into bools; a 1 or "yes" string is a mistake.
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be a boolean (true or false), got {_show(value)}")
        return value
    if tp is int or tp is float:
        return _convert_number(tp, value, key, bound)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {_show(value)}")
        return value
    raise TypeError(f"config schema type {tp!r} at {key!r} is not supported")


def _convert_number(tp: type, value: object, key: str, bound: _Bound | None) -> int | float:
    what = "an integer" if tp is int else "a number"
    expected = what + (bound.describe() if bound else "")
    accepted = (int,) if tp is int else (int, float)
    # bool is a subclass of int, but `port: true` is never what anyone meant.
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigError(key, f"must be {expected}, got {_show(value)}")
    number: int | float = value if tp is int else float(value)
    if not math.isfinite(number) or (bound is not None and not bound.holds(number)):
        raise ConfigError(key, f"must be {expected}, got {_show(value)}")
    return number


def _parse_endpoint(text: str, key: str) -> StaticEndpoint:
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:80"
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            key, f"must be 'host:port' or a mapping with host and port, got {_show(text)}"
        )
    endpoint_port = _convert_number(int, int(port), f"{key}.port", _BOUNDS[StaticEndpoint, "port"])
    return StaticEndpoint(host=host, port=int(endpoint_port))


# --- Checks across fields ---------------------------------------------------------


def _validate(cfg: SidecarConfig) -> None:
    if not _SERVICE_NAME.fullmatch(cfg.service.name):
        raise ConfigError(
            "service.name",
            f"must be lower-case letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit, got {_show(cfg.service.name)}",
        )
    if not cfg.app.health_path.startswith("/"):
        raise ConfigError(
            "app.health_path", f"must start with '/', got {_show(cfg.app.health_path)}"
        )
    for key, host in (
        ("app.host", cfg.app.host),
        ("listeners.outbound.host", cfg.listeners.outbound.host),
        ("listeners.inbound.host", cfg.listeners.inbound.host),
        ("listeners.admin.host", cfg.listeners.admin.host),
        ("listeners.capture.host", cfg.listeners.capture.host),
    ):
        if not host:
            raise ConfigError(key, "must not be empty")
    file = cfg.discovery.file
    if file.ttl <= file.heartbeat_interval:
        raise ConfigError(
            "discovery.file.ttl",
            f"must be greater than discovery.file.heartbeat_interval "
            f"({_num(file.heartbeat_interval)}), got {_num(file.ttl)}",
        )
    _check_pool("upstream", cfg.upstream.max_connections, cfg.upstream.max_per_route)
    _check_balancing("upstream", cfg.upstream.lb_policy, cfg.upstream.hash_header)
    _check_health_path("upstream.health_check", cfg.upstream.health_check)
    for name, override in cfg.services.items():
        _check_service_name(f"services.{name}", name)
        _check_balancing(
            f"services.{name}",
            override.lb_policy or cfg.upstream.lb_policy,
            cfg.upstream.hash_header if override.hash_header is None else override.hash_header,
        )
        if override.health_check is not None:
            _check_health_path(f"services.{name}.health_check", override.health_check)
        _check_pool(
            f"services.{name}",
            override.max_connections or cfg.upstream.max_connections,
            override.max_per_route or cfg.upstream.max_per_route,
        )
    for name in cfg.discovery.static.services:
        _check_service_name(f"discovery.static.services.{name}", name)
    for i, route in enumerate(cfg.routes):
        _check_route(f"routes[{i}]", route)
    _check_capture(cfg.capture)
    # Each filter validates its own config now, before anything binds.
    from sidecar.chain import validate_filters

    validate_filters(cfg)


def _check_pool(key: str, max_connections: int, max_per_route: int) -> None:
    if max_connections < max_per_route:
        raise ConfigError(
            f"{key}.max_connections",
            f"must be >= max_per_route ({max_per_route}), got {max_connections}",
        )


def _check_balancing(key: str, policy: str, hash_header: str) -> None:
    if policy == "ring_hash" and not hash_header:
        raise ConfigError(f"{key}.hash_header", "must name a header when lb_policy is ring_hash")


def _check_health_path(key: str, check: HealthCheckConfig) -> None:
    if not check.path.startswith("/"):
        raise ConfigError(f"{key}.path", f"must start with '/', got {_show(check.path)}")


def _check_capture(capture: CaptureConfig) -> None:
    for i, port in enumerate(capture.opaque_ports):
        if not 1 <= port <= 65535:
            raise ConfigError(f"capture.opaque_ports[{i}]", f"must be in 1..65535, got {port}")
    for address, service in capture.service_ips.items():
        key = f"capture.service_ips.{address}"
        if parse_ip_port(address) is None:
            raise ConfigError(key, "the key must be 'ip', 'ip:port' or '[ipv6]:port'")
        _check_service_name(key, service)


def parse_ip_port(text: str) -> tuple[str, int | None] | None:
    """`10.0.0.1` -> (ip, None); `10.0.0.1:80`, `[::1]:80` -> (ip, 80); None if neither."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        rest = rest[1:]
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
    else:
        rest = ""
    if rest or text.endswith(":"):
        if not rest.isdigit() or not 1 <= int(rest) <= 65535:
            return None
        port = int(rest)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


def _check_service_name(key: str, name: str) -> None:
    if not _SERVICE_NAME.fullmatch(name):
        raise ConfigError(key, f"is not a valid service name: {_show(name)}")


def _check_route(key: str, route: RouteConfig) -> None:
    _check_service_name(f"{key}.service", route.service)
    if bool(route.prefix) == bool(route.grpc_service):
        raise ConfigError(key, "must set exactly one of prefix and grpc_service")
    if route.prefix and not route.prefix.startswith("/"):
        raise ConfigError(f"{key}.prefix", f"must start with '/', got {_show(route.prefix)}")


# --- YAML ----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e.strerror}", path=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text (byte {e.start})", path=path) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no object tags
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError("", f"{where}invalid YAML: {e.problem or e}", path=path) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", path=path) from None


# --- Environment overrides ----------------------------------------------------------

ENV_PREFIX = "OPUS_"
# Read by the client library, not the sidecar: never reported as unknown.
_ENV_NOT_OURS = frozenset({"OPUS_SIDECAR_URL"})


@functools.cache
def _env_leaves() -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every overridable leaf: env var name -> (schema path, type).

    Built by walking the schema, so a field name's own underscores never need
    splitting: `OPUS_UPSTREAM_MAX_PER_ROUTE` is looked up, not parsed.
    """
    leaves: dict[str, tuple[tuple[str, ...], Any]] = {}

    def walk(cls: type, path: tuple[str, ...]) -> None:
        for name, tp in _hints(cls).items():
            sub = (*path, name)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, sub)
            elif get_origin(tp) is dict:
                continue  # keyed collections have no fixed env names
            elif get_origin(tp) is tuple and dataclasses.is_dataclass(get_args(tp)[0]):
                continue
            else:
                var = ENV_PREFIX + "_".join(sub).upper()
                if var in leaves:  # would make one variable mean two keys
                    raise TypeError(f"config keys {leaves[var][0]} and {sub} share {var}")
                leaves[var] = (sub, tp)

    walk(SidecarConfig, ())
    return leaves


def env_override_names() -> dict[str, str]:
    """Every supported `OPUS_*` variable, mapped to the dotted key it sets."""
    return {var: ".".join(path) for var, (path, _) in _env_leaves().items()}


def unknown_env_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    """`OPUS_*` variables that set nothing (probably misspelt), for the CLI to warn about."""
    env = os.environ if environ is None else environ
    leaves = _env_leaves()
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX) and name not in leaves and name not in _ENV_NOT_OURS
    )


def _env_value(tp: Any, text: str) -> object:
    if tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp))):
        return text  # taken verbatim, so OPUS_SERVICE_NAME=123 stays a string
    if get_origin(tp) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not a scalar at all; the type check reports it
    return value


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Set the env values into the raw tree; returns dotted key -> variable for errors."""
    sources: dict[str, str] = {}
    for var, (path, tp) in _env_leaves().items():
        if var not in environ:
            continue
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                break  # the file's own value is malformed; building reports it
            node = child
        else:
            node[path[-1]] = _env_value(tp, environ[var])
            sources[".".join(path)] = var
    return sources


# --- Entry points -------------------------------------------------------------------


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Read the YAML file (if any), apply `OPUS_*` overrides, build and validate.

    `environ` defaults to `os.environ`; pass `{}` to ignore the environment.
    Raises ConfigError naming the key (and the file or variable it came from).
    """
    env = os.environ if environ is None else environ
    raw: object = _read_yaml(path) if path else None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "", f"must hold a mapping at the top level, got {_show(raw)}", path=path or ""
        )
    sources = _apply_env(raw, env)
    try:
        cfg = _build(SidecarConfig, raw, "")
        _validate(cfg)
    except ConfigError as e:
        var = next((v for k, v in sources.items() if _is_within(e.key, k)), "")
        raise ConfigError(e.key, e.message, path=path or "", env_var=var) from None
    return cfg


def build_dataclass(cls: type[_T], raw: object, key: str) -> _T:
    """Build any config dataclass (a filter's config, say) with this module's checks."""
    return _build(cls, raw, key)


def _is_within(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))


def resolve_instance_id(cfg: SidecarConfig) -> str:
    if cfg.service.instance_id:
        return cfg.service.instance_id
    return f"{cfg.service.name}-{socket.gethostname()}-{os.getpid()}"


def advertise_host(cfg: SidecarConfig) -> str:
    """The host other sidecars dial to reach this one's inbound listener."""
    if cfg.listeners.advertise_host:
        return cfg.listeners.advertise_host
    host = cfg.listeners.inbound.host
    # A wildcard bind address is not something a peer can dial.
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def registry_directory(cfg: SidecarConfig) -> str:
    directory = cfg.discovery.file.directory
    return directory or os.path.join(tempfile.gettempdir(), "opus-mesh", "registry")


def config_to_dict(cfg: SidecarConfig) -> dict[str, Any]:
    """The config as plain JSON-able data, in the same shape the YAML file takes."""
    out = _plain(cfg)
    assert isinstance(out, dict)
    return out


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
