"""Values derived from a built config: names, addresses and directories, and a plain form."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from typing import Any

from sidecar.config.schema import SidecarConfig


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
