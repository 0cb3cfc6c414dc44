"""Picks and builds the discovery backend named in the config.

The one place that maps `discovery.backend` to a class. The remote backends are
imported only when chosen, so a sidecar on the file backend never loads py-consul.
"""

from __future__ import annotations

import os
import tempfile
from typing import assert_never

from sidecar.config import SidecarConfig
from sidecar.discovery.base import Discovery
from sidecar.discovery.file import FileDiscovery
from sidecar.discovery.static import StaticDiscovery


def default_registry_directory() -> str:
    return os.path.join(tempfile.gettempdir(), "opus-mesh", "registry")


def create_discovery(cfg: SidecarConfig) -> Discovery:
    discovery = cfg.discovery
    match discovery.backend:
        case "file":
            directory = discovery.file.directory or default_registry_directory()
            return FileDiscovery(discovery.file, directory)
        case "static":
            return StaticDiscovery(discovery.static)
        case "consul":
            from sidecar.discovery.consul import ConsulDiscovery

            return ConsulDiscovery(discovery.consul, cfg.app)
        case "nacos":
            from sidecar.discovery.nacos import NacosDiscovery

            return NacosDiscovery(discovery.nacos, cfg.app)
        case "kubernetes":
            from sidecar.discovery.kubernetes import KubernetesDiscovery

            return KubernetesDiscovery(discovery.kubernetes)
        case _:
            assert_never(discovery.backend)
