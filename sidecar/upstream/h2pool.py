"""A cluster's pool of multiplexed HTTP/2 connections.

New streams go onto an open connection with a free slot before another is
opened; at most `max_per_route` connections per endpoint and `max_connections`
per cluster; a call that finds every allowed connection full waits up to
`pending_timeout` for a slot. Idle connections close after `idle_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import Any

from sidecar.clock import Timer, Timers
from sidecar.discovery.base import Endpoint
from sidecar.errors import PoolExhausted, UpstreamConnectError
from sidecar.messages import Request, Response
from sidecar.metrics import Metrics
from sidecar.tls.contexts import ALPN_H2
from sidecar.tls.upstream import UpstreamTls
from sidecar.upstream.h2client import H2ClientConnection, connect_h2
from sidecar.upstream.pool import PoolLimits, PoolMetrics, wake_all

log = logging.getLogger("sidecar.upstream")

_Key = tuple[str, int]


class H2Pool:
    protocol = "h2c"

    def __init__(
        self,
        service: str,
        limits: PoolLimits,
        metrics: Metrics,
        timers: Timers | None = None,
        tls: UpstreamTls | None = None,
    ) -> None:
        self.service = service
        self.tls = tls  # mTLS to the peer sidecars (ALPN h2); None: h2c
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        # Idle closes and the connections' keepalives keep time with these.
        self.timers: Timers = timers if timers is not None else self.loop
        self._conns: dict[_Key, list[H2ClientConnection]] = {}
        self._connecting: dict[_Key, int] = {}
        self._total = 0  # open + connecting, for max_connections
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle_timers: dict[H2ClientConnection, Timer] = {}
        self._closed = False
        self._metrics = PoolMetrics(metrics, service, self.protocol)

    async def request(
        self, endpoint: Endpoint, request: Request, authority: bytes, path: bytes
    ) -> Response:
        conn = await self._acquire(endpoint)
        self._metrics.stream()
        return await conn.request(request, authority, path)

    # -- slots --
    def _pick(self, key: _Key) -> H2ClientConnection | None:
        for conn in self._conns.get(key, ()):
            if conn.has_capacity():
                conn.reserved += 1
                timer = self._idle_timers.pop(conn, None)
                if timer is not None:
                    timer.cancel()
                return conn
        return None

    async def _acquire(self, endpoint: Endpoint) -> H2ClientConnection:
        key = (endpoint.host, endpoint.port)
        conn = self._pick(key)
        if conn is not None:
            return conn
        deadline = self.loop.time() + self.limits.pending_timeout
        while True:
            conn = self._pick(key)
            if conn is not None:
                return conn
            opening = self._connecting.get(key, 0)
            per_route = len(self._conns.get(key, ())) + opening
            if (
                opening == 0
                and per_route < self.limits.max_per_route
                and self._total < self.limits.max_connections
            ):
                conn = await self._open(endpoint, key)
                conn.reserved += 1
                return conn
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise PoolExhausted(
                    f"no free HTTP/2 stream to {endpoint.address} within "
                    f"{self.limits.pending_timeout}s (max_per_route={self.limits.max_per_route}, "
                    f"max_connections={self.limits.max_connections})",
                    service=self.service,
                )
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)

    async def _open(self, endpoint: Endpoint, key: _Key) -> H2ClientConnection:
        self._connecting[key] = self._connecting.get(key, 0) + 1
        self._total += 1
        tls = self.tls
        # Only with mTLS: the h2c call is the one it always was.
        secure = {"ssl": tls.context(ALPN_H2)} if tls is not None else {}
        try:
            conn = await connect_h2(
                endpoint.host,
                endpoint.port,
                self.limits.connect_timeout,
                self._changed,
                (self.limits.keepalive_interval, self.limits.keepalive_timeout),
                self.timers,
                **secure,
            )
            if tls is not None:  # secure naming: the target service's identity, or refused
                tls.verify(conn.transport, self.service, endpoint, ALPN_H2, conn.close)
        except BaseException as exc:
            if tls is not None and isinstance(exc, ssl.SSLError):
                tls.handshake_failed(self.service, endpoint, exc)
            self._connecting[key] -= 1
            self._total -= 1
            self._wake()
            if isinstance(exc, OSError | TimeoutError):
                raise UpstreamConnectError(
                    f"cannot connect to {endpoint.address}: {exc or 'timed out'}",
                    service=self.service,
                ) from None
            raise
        self._connecting[key] -= 1
        if self._closed:
            self._total -= 1
            conn.close()
            raise UpstreamConnectError("pool closed", service=self.service)
        # Registered before waiters wake, so they take a slot on it rather than open another.
        self._conns.setdefault(key, []).append(conn)
        self._metrics.opened()
        self._wake()
        return conn

    def _changed(self, conn: H2ClientConnection) -> None:
        """A connection freed a slot, changed its limits, got a GOAWAY or died."""
        if conn.closed:
            self._forget(conn)
        elif conn.active == 0 and conn not in self._idle_timers:
            self._idle_timers[conn] = self.timers.call_later(
                self.limits.idle_timeout, self._idle_check, conn
            )
        self._wake()

    def _forget(self, conn: H2ClientConnection) -> None:
        timer = self._idle_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        for key, conns in self._conns.items():
            if conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._conns[key]
                self._total -= 1
                self._metrics.closed(conn.uses)
                return

    def _idle_check(self, conn: H2ClientConnection) -> None:
        self._idle_timers.pop(conn, None)
        if conn.closed or conn.active:
            return
        idle_for = self.timers.time() - conn.last_active
        if idle_for + 0.001 >= self.limits.idle_timeout:
            log.debug("closing idle HTTP/2 connection to %s", self.service)
            conn.close()
            self._forget(conn)
        else:
            self._idle_timers[conn] = self.timers.call_later(
                self.limits.idle_timeout - idle_for, self._idle_check, conn
            )

    def _wake(self) -> None:
        wake_all(self._waiters)

    # -- admin and lifecycle --
    def connection_count(self) -> int:
        return sum(len(conns) for conns in self._conns.values())

    def snapshot(self, endpoint: Endpoint) -> dict[str, Any]:
        conns = self._conns.get((endpoint.host, endpoint.port), [])
        return {
            "protocol": self.protocol,
            "connections": [
                {"active_streams": c.active, "max_streams": c.max_streams, "goaway": c.goaway}
                for c in conns
            ],
        }

    def close(self) -> None:
        self._closed = True
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
                self._forget(conn)
        self._wake()
