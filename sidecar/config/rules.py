"""Per-field rules the schema's types cannot express: ranges, spellings, short forms."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config.schema import (
    AppConfig,
    CaptureConfig,
    CaptureListenerConfig,
    ClusterOverride,
    ConsulDiscoveryConfig,
    FileDiscoveryConfig,
    FiltersConfig,
    HealthCheckConfig,
    Http2ServerConfig,
    KubernetesDiscoveryConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    NacosDiscoveryConfig,
    OutlierConfig,
    ReloadConfig,
    SidecarConfig,
    StaticEndpoint,
    TlsConfig,
    TlsConsulConfig,
    TlsDevConfig,
    TlsFileConfig,
    TlsVaultConfig,
    UpstreamConfig,
)
from sidecar.typedconfig import Bound, ConfigError, Rules, check_number, show

_PORT = Bound(0, 65535)  # 0: the OS picks a free port (tests read it back)
_AT_LEAST_ONE = Bound(1)
_POSITIVE = Bound(0, low_open=True)

_BOUNDS: dict[tuple[type, str], Bound] = {
    (AppConfig, "port"): _PORT,
    (AppConfig, "max_connections"): _AT_LEAST_ONE,
    (ListenerConfig, "port"): _PORT,
    (CaptureListenerConfig, "port"): _PORT,
    (CaptureConfig, "detect_timeout"): _POSITIVE,
    (CaptureConfig, "connect_timeout"): _POSITIVE,
    (StaticEndpoint, "port"): Bound(1, 65535),  # a peer's port must be concrete
    (StaticEndpoint, "weight"): _AT_LEAST_ONE,
    (FileDiscoveryConfig, "heartbeat_interval"): _POSITIVE,
    (FileDiscoveryConfig, "ttl"): _POSITIVE,
    (FileDiscoveryConfig, "poll_interval"): _POSITIVE,
    (ConsulDiscoveryConfig, "wait"): Bound(1, 600),  # Consul caps wait at 10 minutes
    (ConsulDiscoveryConfig, "max_queries_per_second"): _POSITIVE,
    (ConsulDiscoveryConfig, "retry_max"): _POSITIVE,
    (ConsulDiscoveryConfig, "request_timeout"): _POSITIVE,
    (ConsulDiscoveryConfig, "ttl"): Bound(1),
    (ConsulDiscoveryConfig, "check_interval"): Bound(0.05),
    (ConsulDiscoveryConfig, "check_timeout"): _POSITIVE,
    (ConsulDiscoveryConfig, "deregister_critical_after"): Bound(60),
    (NacosDiscoveryConfig, "beat_interval"): Bound(1),
    (NacosDiscoveryConfig, "poll_interval"): Bound(0.05),
    (NacosDiscoveryConfig, "request_timeout"): _POSITIVE,
    (KubernetesDiscoveryConfig, "port"): Bound(1, 65535),
    (KubernetesDiscoveryConfig, "resolve_interval"): Bound(0.05),
    (KubernetesDiscoveryConfig, "resolve_timeout"): _POSITIVE,
    (HealthCheckConfig, "interval"): Bound(0.05),
    (HealthCheckConfig, "timeout"): _POSITIVE,
    (HealthCheckConfig, "healthy_threshold"): _AT_LEAST_ONE,
    (HealthCheckConfig, "unhealthy_threshold"): _AT_LEAST_ONE,
    (OutlierConfig, "consecutive_5xx"): _AT_LEAST_ONE,
    (OutlierConfig, "consecutive_connect_failures"): _AT_LEAST_ONE,
    (OutlierConfig, "base_ejection_time"): _POSITIVE,
    (OutlierConfig, "max_ejection_time"): _POSITIVE,
    (OutlierConfig, "max_ejection_percent"): Bound(0, 100),
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
    (SidecarConfig, "workers"): Bound(1, 64),
    (Http2ServerConfig, "initial_window_size"): Bound(0, 2**31 - 1),
    (Http2ServerConfig, "max_frame_size"): Bound(16384, 2**24 - 1),
    (LimitsConfig, "max_request_line"): _AT_LEAST_ONE,
    (LimitsConfig, "max_header_bytes"): _AT_LEAST_ONE,
    (LimitsConfig, "header_read_timeout"): _POSITIVE,
    (LimitsConfig, "preface_timeout"): _POSITIVE,
    (LimitsConfig, "idle_timeout"): _POSITIVE,
    (LimitsConfig, "body_read_timeout"): _POSITIVE,
    (LimitsConfig, "max_connections"): _AT_LEAST_ONE,
    (LimitsConfig, "fd_reserve"): Bound(0),
    (SidecarConfig, "drain_timeout"): Bound(0),  # 0: close at once, no drain
    (ReloadConfig, "poll_interval"): Bound(0.05, 60),
    (TlsConfig, "handshake_timeout"): _POSITIVE,
    (TlsFileConfig, "poll_interval"): Bound(0.05),
    (TlsDevConfig, "ttl"): Bound(1),
    (TlsConsulConfig, "wait"): Bound(1, 600),  # Consul caps wait at 10 minutes
    (TlsConsulConfig, "request_timeout"): _POSITIVE,
    (TlsConsulConfig, "retry_max"): _POSITIVE,
    (TlsConsulConfig, "max_queries_per_second"): _POSITIVE,
    (TlsConsulConfig, "start_timeout"): _POSITIVE,
    (TlsVaultConfig, "ttl"): Bound(1),
    (TlsVaultConfig, "timeout"): _POSITIVE,
    (TlsVaultConfig, "retry_max"): Bound(0.05),
}

# Applied to a raw value before its type check, so `level: debug` is accepted.
_NORMALIZE: dict[tuple[type, str], Callable[[str], str]] = {
    (LogConfig, "level"): str.upper,
}


def _parse_endpoint(text: str, key: str) -> StaticEndpoint:
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:80"
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            key, f"must be 'host:port' or a mapping with host and port, got {show(text)}"
        )
    endpoint_port = check_number(int, int(port), f"{key}.port", _BOUNDS[StaticEndpoint, "port"])
    return StaticEndpoint(host=host, port=int(endpoint_port))


SIDECAR_RULES = Rules(
    bounds=_BOUNDS,
    normalize=_NORMALIZE,
    # `- 10.0.0.5:8000` as well as `- {host: 10.0.0.5, port: 8000}`.
    from_text={StaticEndpoint: _parse_endpoint},
)
