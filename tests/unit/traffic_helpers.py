"""A sidecar's outbound handler built from a config text, on static discovery, for the
route rules' unit tests (no sockets: nothing is sent unless a test runs a chain)."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sidecar.accesslog import AccessLog
from sidecar.clusters import ClusterManager
from sidecar.config import SidecarConfig, load_config
from sidecar.discovery.static import StaticDiscovery
from sidecar.messages import Headers, Request, fixed_body
from sidecar.metrics import Metrics
from sidecar.proxy import OutboundHandler
from sidecar.routing import Router
from sidecar.tracing import Tracing

_T = TypeVar("_T")


def in_loop(fn: Callable[[], _T]) -> _T:
    """Run `fn` on a running event loop (pools are made on a cluster's first use)."""

    async def main() -> _T:
        return fn()

    return asyncio.run(main())


STATIC = """
discovery:
  backend: static
  static:
    services:
      inventory:
        - {host: 10.0.0.1, port: 15006, meta: {version: v1}}
        - {host: 10.0.0.2, port: 15006, meta: {version: v1}}
        - {host: 10.0.0.3, port: 15006, meta: {version: v2}}
      shadow:
        - {host: 10.0.1.1, port: 15006}
      billing:
        - {host: 10.0.2.1, port: 15006}
"""


def config(tmp_path: Path, text: str) -> SidecarConfig:
    path = tmp_path / "sidecar.yaml"
    path.write_text("service: {name: payment}\n" + STATIC + textwrap.dedent(text))
    return load_config(str(path), environ={})


def outbound(tmp_path: Path, text: str) -> tuple[OutboundHandler, Metrics]:
    cfg = config(tmp_path, text)
    metrics = Metrics()
    clusters = ClusterManager(cfg, StaticDiscovery(cfg.discovery.static), metrics)
    router = Router(cfg.routes, clusters.knows)
    handler = OutboundHandler(cfg, router, clusters, metrics, AccessLog(""), Tracing(None))
    return handler, metrics


def request(
    path: bytes = b"/v1/invoke/inventory/items",
    headers: Headers | None = None,
    method: bytes = b"GET",
    body: bytes = b"",
) -> Request:
    return Request(method, path, b"127.0.0.1:8080", list(headers or []), fixed_body(body))
