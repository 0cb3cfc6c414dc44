"""HTTP/1.1 client connections to the local app, on httptools, and their keep-alive pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from typing import Any, cast

import httptools

from sidecar.discovery.base import Endpoint
from sidecar.errors import PoolExhausted, StreamRefused, UpstreamConnectError, UpstreamReset
from sidecar.metrics import Metrics
from sidecar.proto.messages import HOP_BY_HOP, Body, BodyError, Headers, Request, Response
from sidecar.upstream.pool import PoolLimits, PoolMetrics, wake_all

log = logging.getLogger("sidecar.upstream")

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_READ_HIGH_WATER = 256 * 1024
_READ_LOW_WATER = 64 * 1024


class H1ClientConnection(asyncio.Protocol):
    def __init__(self, pool: H1Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.uses = 0
        self.last_active = 0.0
        self._response: asyncio.Future[Response] | None = None
        self._headers: Headers = []
        self._body: Body | None = None
        self._head_request = False
        self._idempotent = False
        self._request_sent = False
        self._got_bytes = False
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(UpstreamReset(f"malformed HTTP/1.1 response from the app: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is not None or self._body is not None:
            reused = self.uses > 1
            if not self._got_bytes and reused and self._idempotent:
                # A kept-alive connection the app had already closed: nothing was processed.
                self._lost(StreamRefused("the app closed a kept-alive connection"))
            else:
                self._lost(UpstreamReset("the app closed the connection mid-call"))
        self._wake_drain()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self._headers = []  # 1xx: informational, the real response follows
            return
        headers: Headers = []
        drop: set[bytes] = set()
        for name, value in self._headers:
            if name == b"connection":
                drop.update(t.strip().lower() for t in value.split(b","))
        for name, value in self._headers:
            if name not in HOP_BY_HOP and name not in drop:
                headers.append((name, value))
        self._headers = []
        body = Body()
        body.on_consumed = self._consumed
        body.on_cancel = self._cancel
        self._body = body
        waiter = self._response
        self._response = None
        if self._head_request or status in (204, 304):
            body.finish()
            self._body = None
            # httptools cannot be told a HEAD response has no body: do not reuse.
            if self._head_request:
                self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(status, headers, body))

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            body.feed(data)
            if body.buffered > _READ_HIGH_WATER and not self._reading_paused:
                self._reading_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        body = self._body
        self._body = None
        if body is not None:
            body.finish()
        keep = bool(self.parser.should_keep_alive()) and self._request_sent
        self.pool._release(self, keep)

    # -- calls --
    async def request(self, request: Request, authority: bytes, path: bytes) -> Response:
        self.uses += 1
        self._got_bytes = False
        self._request_sent = False
        self._head_request = request.method == b"HEAD"
        self._idempotent = request.method in _IDEMPOTENT
        transport = self.transport
        assert transport is not None
        parts = [request.method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
        body = request.body
        declared_length: bytes | None = None
        for name, value in request.headers:
            if name == b"content-length":
                declared_length = value
                continue
            parts += (name, b": ", value, b"\r\n")
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._response = waiter
        if body.complete:
            data = body.read_nowait() or b""
            if data or request.method in _BODY_METHODS:
                parts += (b"content-length: ", str(len(data)).encode(), b"\r\n")
            parts += (b"\r\n", data)
            transport.write(b"".join(parts))
            self._request_sent = True
        else:
            chunked = declared_length is None
            if chunked:
                parts.append(b"transfer-encoding: chunked\r\n\r\n")
            else:
                parts += (b"content-length: ", declared_length or b"0", b"\r\n\r\n")
            transport.write(b"".join(parts))
            self._sender = self.loop.create_task(self._send_body(body, chunked))
        try:
            return await waiter
        except asyncio.CancelledError:
            self._cancel()
            raise

    async def _send_body(self, body: Body, chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        try:
            while True:
                chunk = await body.read()
                if not chunk:
                    break
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self._write_paused:
                    self._drain = self.loop.create_future()
                    await self._drain
                    if self.closed:
                        return
            if chunked:
                transport.write(b"0\r\n\r\n")
            self._request_sent = True
        except BodyError:
            self.close()  # the caller went away mid-body: the app's call is void

    def _consumed(self, size: int) -> None:
        body = self._body
        if self._reading_paused and (body is None or body.buffered < _READ_LOW_WATER):
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _cancel(self) -> None:
        """The caller gave up on the response: the connection cannot be reused."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        self._response = None
        self._body = None
        self.close()

    def _lost(self, error: Exception) -> None:
        waiter, self._response = self._response, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        body, self._body = self._body, None
        if body is not None:
            body.fail(error)
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class H1Pool:
    """Keep-alive HTTP/1.1 connections, one call at a time each (to the local app)."""

    protocol = "http1"

    def __init__(self, service: str, limits: PoolLimits, metrics: Metrics) -> None:
        self.service = service
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self._idle: dict[tuple[str, int], list[H1ClientConnection]] = {}
        self._all: set[H1ClientConnection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._metrics = PoolMetrics(metrics, service, self.protocol)

    async def request(
        self, endpoint: Endpoint, request: Request, authority: bytes, path: bytes
    ) -> Response:
        conn = await self._acquire(endpoint)
        self._metrics.stream()
        return await conn.request(request, authority, path)

    async def _acquire(self, endpoint: Endpoint) -> H1ClientConnection:
        key = (endpoint.host, endpoint.port)
        deadline = self.loop.time() + self.limits.pending_timeout
        while True:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()  # most recently used: least likely closed by the app
                if not conn.closed:
                    return conn
            if len(self._all) + self._connecting < self.limits.max_connections:
                return await self._open(endpoint, key)
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise PoolExhausted(
                    f"all {self.limits.max_connections} connections to {endpoint.address} busy "
                    f"for {self.limits.pending_timeout}s",
                    service=self.service,
                )
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)

    async def _open(self, endpoint: Endpoint, key: tuple[str, int]) -> H1ClientConnection:
        self._connecting += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: H1ClientConnection(self, key), endpoint.host, endpoint.port
                ),
                self.limits.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(
                f"cannot connect to {endpoint.address}: {exc or 'timed out'}",
                service=self.service,
            ) from None
        finally:
            self._connecting -= 1
        self._all.add(conn)
        self._metrics.opened()
        return conn

    def _release(self, conn: H1ClientConnection, keep: bool) -> None:
        if conn not in self._all:
            return
        if keep and not conn.closed:
            conn.last_active = self.loop.time()
            self._idle.setdefault(conn.key, []).append(conn)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self.limits.idle_timeout, self._sweep)
        else:
            conn.close()
        self._wake()

    def _forget(self, conn: H1ClientConnection) -> None:
        if conn not in self._all:
            return
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._metrics.closed(conn.uses)
        self._wake()

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - self.limits.idle_timeout
        pending = False
        for conns in self._idle.values():
            for conn in list(conns):
                if conn.last_active <= cutoff:
                    conn.close()
                else:
                    pending = True
        if pending:
            self._sweeper = self.loop.call_later(self.limits.idle_timeout / 2, self._sweep)

    def _wake(self) -> None:
        wake_all(self._waiters)

    def connection_count(self) -> int:
        return len(self._all)

    def snapshot(self, endpoint: Endpoint) -> dict[str, Any]:
        key = (endpoint.host, endpoint.port)
        idle = len(self._idle.get(key, ()))
        total = sum(1 for c in self._all if c.key == key)
        return {"protocol": self.protocol, "connections": total, "idle": idle}

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
