"""What every upstream pool offers the proxy core, and the settings it is built with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.discovery.base import Endpoint
from sidecar.proto.messages import Request, Response


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
