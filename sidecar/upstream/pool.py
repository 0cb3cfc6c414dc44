"""What every upstream pool offers the proxy core, and the settings it is built with."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.discovery.base import Endpoint
from sidecar.messages import Request, Response
from sidecar.metrics import Metrics


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 20
    max_per_route: int = 5
    idle_timeout: float = 30.0
    connect_timeout: float = 1.0
    pending_timeout: float = 1.0
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 5.0


class Pool(Protocol):
    protocol: str

    async def request(
        self, endpoint: Endpoint, request: Request, authority: bytes, path: bytes
    ) -> Response:
        """Send the call to `endpoint`; returns once the response head has arrived."""
        ...

    def snapshot(self, endpoint: Endpoint) -> dict[str, Any]: ...

    def connection_count(self) -> int: ...

    def close(self) -> None: ...


class PoolMetrics:
    """One pool's connection and stream metrics, the labelled children resolved once."""

    def __init__(self, metrics: Metrics, service: str, protocol: str) -> None:
        labels = self._labels = (service, protocol)
        self._open = metrics.upstream_connections.labels(*labels)
        self._opened = metrics.upstream_connections_opened.labels(*labels)
        self._closed = metrics.upstream_connections_closed.labels(*labels)
        metrics.upstream_streams.labels(*labels)  # the series shows 0 from the start
        # Once per call: a plain count, folded into upstream_streams when metrics are read.
        self._streams = metrics.pending_streams
        self._uses = metrics.streams_per_connection.labels(*labels)

    def opened(self) -> None:
        self._opened.inc()
        self._open.inc()

    def closed(self, uses: int) -> None:
        self._uses.observe(uses)
        self._closed.inc()
        self._open.dec()

    def stream(self) -> None:
        self._streams[self._labels].count += 1


def wake_all(waiters: deque[asyncio.Future[None]]) -> None:
    """Let every call waiting for a pool slot look again."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
