"""The sidecar's configuration: typed, frozen objects parsed once at start.

Every error names the key it is about and is raised before any port is bound.
The package's modules, in the order a config passes them:

- `yamlfile`: the file's YAML, read strictly (duplicate keys are errors);
- `env`: `OPUS_*` environment overrides, set into the parsed tree;
- `schema`: the frozen dataclasses, built by `sidecar.typedconfig` with the
  per-field ranges and spellings in `rules`;
- `checks`: checks across fields, then each filter's own config;
- `load`: `load_config`, which runs the steps above; `derived`: values computed
  from a built config.
"""

from __future__ import annotations

from sidecar.config.checks import parse_ip_port
from sidecar.config.derived import (
    ClusterSettings,
    advertise_host,
    cluster_settings,
    config_to_dict,
    registry_directory,
    resolve_instance_id,
)
from sidecar.config.env import ENV_PREFIX, env_override_names, unknown_env_overrides
from sidecar.config.load import build_dataclass, load_config, load_config_bytes
from sidecar.config.routerules import (
    Destination,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    FilterSpec,
    GrpcMatch,
    HeaderMatch,
    MirrorConfig,
    PathMatch,
    QueryMatch,
    RouteMatch,
    RouteRetry,
    RouteRule,
)
from sidecar.config.schema import (
    AppConfig,
    AppProtocol,
    CaptureConfig,
    CaptureListenerConfig,
    ClusterOverride,
    ConsulDiscoveryConfig,
    DiscoveryBackend,
    DiscoveryConfig,
    FileDiscoveryConfig,
    FiltersConfig,
    HealthCheckConfig,
    Http2ServerConfig,
    KubernetesDiscoveryConfig,
    LbPolicy,
    LimitsConfig,
    ListenerConfig,
    ListenersConfig,
    LogConfig,
    LogLevel,
    NacosDiscoveryConfig,
    OutlierConfig,
    ReloadConfig,
    RouteConfig,
    ServiceConfig,
    SidecarConfig,
    StaticDiscoveryConfig,
    StaticEndpoint,
    UpstreamConfig,
    UpstreamProtocol,
)
from sidecar.typedconfig import ConfigError

__all__ = [
    "ENV_PREFIX",
    "AppConfig",
    "AppProtocol",
    "CaptureConfig",
    "CaptureListenerConfig",
    "ClusterOverride",
    "ClusterSettings",
    "ConfigError",
    "ConsulDiscoveryConfig",
    "Destination",
    "DiscoveryBackend",
    "DiscoveryConfig",
    "FaultAbort",
    "FaultConfig",
    "FaultDelay",
    "FileDiscoveryConfig",
    "FilterSpec",
    "FiltersConfig",
    "GrpcMatch",
    "HeaderMatch",
    "HealthCheckConfig",
    "Http2ServerConfig",
    "KubernetesDiscoveryConfig",
    "LbPolicy",
    "LimitsConfig",
    "ListenerConfig",
    "ListenersConfig",
    "LogConfig",
    "LogLevel",
    "MirrorConfig",
    "NacosDiscoveryConfig",
    "OutlierConfig",
    "PathMatch",
    "QueryMatch",
    "ReloadConfig",
    "RouteConfig",
    "RouteMatch",
    "RouteRetry",
    "RouteRule",
    "ServiceConfig",
    "SidecarConfig",
    "StaticDiscoveryConfig",
    "StaticEndpoint",
    "UpstreamConfig",
    "UpstreamProtocol",
    "advertise_host",
    "build_dataclass",
    "cluster_settings",
    "config_to_dict",
    "env_override_names",
    "load_config",
    "load_config_bytes",
    "parse_ip_port",
    "registry_directory",
    "resolve_instance_id",
    "unknown_env_overrides",
]
