"""Values derived from a built config: names, addresses and directories, and a plain form."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

from sidecar.config.schema import (
    HealthCheckConfig,
    LbPolicy,
    OutlierConfig,
    SidecarConfig,
    UpstreamProtocol,
)
from sidecar.typedconfig import config_name


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


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Everything an outbound cluster (its pool, balancer and health) is built from: a
    reload keeps a cluster, and its pooled connections, while these stay equal."""

    protocol: UpstreamProtocol
    max_connections: int
    max_per_route: int
    idle_timeout: float
    connect_timeout: float
    pending_timeout: float
    keepalive_interval: float
    keepalive_timeout: float
    max_header_bytes: int  # HTTP/1.1 pools: a response head's limit
    lb_policy: LbPolicy
    hash_header: str
    zone: str  # the zone calls prefer; empty: none
    outlier: OutlierConfig
    health_check: HealthCheckConfig
    # mTLS: the SPIFFE ID its peers must present, if the config names one (a change
    # replaces the cluster, so no connection verified against the old one is reused).
    identity: str | None = None


def cluster_settings(cfg: SidecarConfig, service: str) -> ClusterSettings:
    """The upstream defaults with `services.<service>`'s overrides applied."""
    up = cfg.upstream
    override = cfg.services.get(service)
    hash_header = up.hash_header
    if override is not None and override.hash_header is not None:
        hash_header = override.hash_header
    return ClusterSettings(
        protocol=up.protocol,
        max_connections=(override and override.max_connections) or up.max_connections,
        max_per_route=(override and override.max_per_route) or up.max_per_route,
        idle_timeout=up.idle_timeout,
        connect_timeout=up.connect_timeout,
        pending_timeout=up.pending_timeout,
        keepalive_interval=up.keepalive_interval,
        keepalive_timeout=up.keepalive_timeout,
        max_header_bytes=cfg.limits.max_header_bytes,
        lb_policy=(override and override.lb_policy) or up.lb_policy,
        hash_header=hash_header,
        zone=cfg.service.zone if up.zone_aware else "",
        outlier=(override and override.outlier) or up.outlier,
        health_check=(override and override.health_check) or up.health_check,
        identity=override.identity if override is not None else None,
    )


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
        fields = dataclasses.fields(value)
        return {config_name(f.name): _plain(getattr(value, f.name)) for f in fields}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
