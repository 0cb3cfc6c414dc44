"""The sidecar's configuration: typed, frozen objects parsed once at start.

Owns the schema (the dataclasses below), YAML loading, `OPUS_*` environment
overrides and validation. Every error names the key it is about and is raised
before any port is bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
AppProtocol = Literal["http1", "h2c"]
UpstreamProtocol = Literal["h2c", "http1"]
LbPolicy = Literal["round_robin", "least_request"]
DiscoveryBackend = Literal["file", "static"]


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
class ListenersConfig:
    outbound: ListenerConfig = ListenerConfig("127.0.0.1", 8080)
    inbound: ListenerConfig = ListenerConfig("0.0.0.0", 15006)
    admin: ListenerConfig = ListenerConfig("0.0.0.0", 9090)
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
class DiscoveryConfig:
    backend: DiscoveryBackend = "file"
    register: bool = True  # register the local app as an instance of service.name
    file: FileDiscoveryConfig = FileDiscoveryConfig()
    static: StaticDiscoveryConfig = StaticDiscoveryConfig()


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
    lb_policy: LbPolicy = "round_robin"


@dataclass(frozen=True, slots=True)
class ClusterOverride:
    """Per-service overrides of the upstream defaults."""

    lb_policy: LbPolicy | None = None
    max_connections: int | None = None
    max_per_route: int | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """An explicit outbound route: a path prefix or a gRPC service name to a service."""

    service: str
    prefix: str = ""
    grpc_service: str = ""


@dataclass(frozen=True, slots=True)
class Http2ServerConfig:
    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    max_frame_size: int = 16384


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    header_read_timeout: float = 10.0


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
    http2: Http2ServerConfig = Http2ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    drain_timeout: float = 10.0
