"""HTTP/1.1 client connections to the local app, on httptools, and their keep-alive pool.

Both work with callbacks first, so the proxy's callback path (callbacks.py) can run a
call without a task, with futures on top for the coroutine path:

- a connection hands the response head to whoever waits for it, a future (`request()`)
  or a callback (`send()`), once the bytes that carried it are parsed (the body is then
  often whole already); a waiting task hears of it before the pool takes the connection
  back, a callback after the pool took it back but before another call may have it;
- the pool hands a connection released to the oldest call waiting for one to the same
  endpoint, and a freed slot to the oldest call waiting at all, rather than waking every
  waiter to look again; one timer covers every waiter's `pending_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, cast

import httptools

from sidecar.discovery.base import Endpoint
from sidecar.errors import (
    BadRequest,
    MeshError,
    PoolExhausted,
    StreamRefused,
    UpstreamConnectError,
    UpstreamReset,
)
from sidecar.messages import (
    HOP_BY_HOP,
    Body,
    BodyError,
    Headers,
    Request,
    Response,
    content_length,
)
from sidecar.metrics import Metrics
from sidecar.proto.h1head import (
    BAD,
    FRAMING_FIELDS,
    KINDS,
    LENGTH,
    bad_field,
    bad_request_part,
    kind_of,
    last_chunk,
    request_head_ok,
)
from sidecar.upstream.pool import PoolLimits, PoolMetrics

log = logging.getLogger("sidecar.upstream")

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_READ_HIGH_WATER = 256 * 1024
_READ_LOW_WATER = 64 * 1024

# What a call waiting for a response head is told: the head, or why there is none.
HeadCallback = Callable[[Response | MeshError], None]
# What a call waiting for a connection is told: one to use, or why there is none.
ConnCallback = Callable[["H1ClientConnection | Exception"], None]


class _ResponseAbort(Exception):
    """A response the connection refuses to read on (its reason is the call's error)."""


class H1ClientConnection(asyncio.Protocol):
    def __init__(self, pool: H1Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self._max_header_bytes = pool.max_header_bytes
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.uses = 0
        self.last_active = 0.0
        # Who waits for the response head: a future (request()) or a callback (send()).
        self._waiter: asyncio.Future[Response] | None = None
        self._on_head: HeadCallback | None = None
        self._ready: Response | None = None  # a head parsed, not yet handed over
        self._by_future = False
        self._owned: Body | None = None  # the current call's response body
        # The fields being parsed: the head's, then (a new list, once the head is a
        # Response) the trailers', a block of their own. Empty between responses.
        self._headers: Headers = []
        self._drop: set[bytes] | None = None  # header names a `Connection:` header listed
        # limits.max_header_bytes is counted in the bytes read while a head is incomplete
        # (a read per response, not a sum per field); the head's own fields are counted
        # exactly only when those bytes go over it (the read held a body as well).
        self._in_head = True
        self._head_bytes = 0
        self._trailer_bytes = 0  # of the fields counted so far, trailers arriving
        self._trailers_counted = 0
        self._body: Body | None = None
        self._head_request = False
        self._idempotent = False
        self._request_sent = False
        self._got_bytes = False
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._on_consumed = self._consumed  # bound once, not per response
        self._on_cancel = self._cancel

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
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; our own refusals carry the reason.
            cause = exc.__context__
            self._refused(str(cause) if isinstance(cause, _ResponseAbort) else f"malformed: {exc}")
            return
        if self._ready is not None:
            self._hand_over()  # the body goes on arriving after the head
        if self._in_head:
            if self._head_bytes > self._max_header_bytes:
                self._refused(self._over("headers"))
        elif self._headers:
            self._count_trailers()  # trailers arriving: over the limit already?

    def _count_trailers(self) -> None:
        fields = self._headers
        counted = self._trailers_counted
        self._trailer_bytes += _field_bytes(fields[counted:])
        self._trailers_counted = len(fields)
        if self._trailer_bytes > self._max_header_bytes:
            self._refused(self._over("trailers"))

    def _over(self, what: str) -> str:
        return f"response {what} over {self._max_header_bytes} bytes (limits.max_header_bytes)"

    def _refused(self, reason: str) -> None:
        self._hand_over()
        self._lost(UpstreamReset(f"HTTP/1.1 response from the app refused: {reason}"))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pool = self.pool
        # Out of the pool's count before the call hears of it, so a resend finds the slot.
        known = pool._remove(self)
        if self._waiter is not None or self._on_head is not None or self._body is not None:
            reused = self.uses > 1
            if not self._got_bytes and reused and self._idempotent:
                # A kept-alive connection the app had already closed: nothing was processed.
                self._lost(StreamRefused("the app closed a kept-alive connection"))
            else:
                self._lost(UpstreamReset("the app closed the connection mid-call"))
        self._wake_drain()
        if known:
            pool._slot_freed()

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
        name = name.lower()
        if name in HOP_BY_HOP:
            if not self._in_head:
                return  # a trailer: framing means nothing there (RFC 9110 6.5.1), dropped
            if name == b"transfer-encoding":
                for coding in value.split(b","):
                    coding = coding.strip().lower()
                    if coding != b"chunked":
                        raise _ResponseAbort(
                            f"transfer coding {coding.decode('latin-1')[:40]!r} is not implemented"
                        )
            elif name == b"connection":
                # Headers it names go too; hop-by-hop ones (keep-alive) are gone already.
                for token in value.split(b","):
                    token = token.strip().lower()
                    if token not in HOP_BY_HOP:
                        if self._drop is None:
                            self._drop = set()
                        self._drop.add(token)
            return
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers = self._headers
        self._headers = []
        drop = self._drop
        self._drop = None
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx: informational, the real response follows
        self._in_head = False
        if self._head_bytes > self._max_header_bytes and (
            _field_bytes(headers) > self._max_header_bytes
        ):
            raise _ResponseAbort(self._over("headers"))
        if drop:
            headers = [(n, v) for n, v in headers if n not in drop]
        body = Body(replayable=False)
        body.on_consumed = self._on_consumed
        body.on_cancel = self._on_cancel
        self._body = body
        self._owned = body
        if self._head_request or status == 204 or status == 304:
            body.finish()
            self._body = None
            # httptools cannot be told a HEAD response has no body: do not reuse.
            if self._head_request:
                self.close()
        self._ready = Response(status, headers, body)

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
        self._in_head = True
        self._head_bytes = 0
        trailers = self._headers
        if trailers:
            self._headers = []
            counted = self._trailers_counted
            size = self._trailer_bytes + _field_bytes(trailers[counted:])
            self._trailer_bytes = self._trailers_counted = 0
            if size > self._max_header_bytes:
                raise _ResponseAbort(self._over("trailers"))
            trailers = [(n, v) for n, v in trailers if n not in FRAMING_FIELDS]
        body = self._body
        self._body = None
        if body is not None:
            body.finish(trailers)
        keep = bool(self.parser.should_keep_alive()) and self._request_sent
        if self._by_future:
            # The waiting task hears of the response on its next step; the pool takes
            # the connection back after that step, as when the task woke first.
            self._hand_over()
            self.loop.call_soon(self._release, keep)
            return
        response = self._ready
        if response is None or self.closed:
            # Handed over already (its body was still arriving then), or the connection
            # is closing (a HEAD): nothing to wait for, and nothing must come first.
            self._conclude(response, keep)
            return
        # Handed over once the loop has read what else arrived this turn, as a waiting
        # task would hear of it: responses then go out in a batch (less CPU here).
        self._ready = None
        self.loop.call_soon(self._conclude, response, keep)

    def _conclude(self, response: Response | None, keep: bool) -> None:
        # The pool takes the connection back first (the call's next step may be the next
        # pipelined request, which may use it), but hands it to a call waiting for one
        # only once this call is through with its response (which may close it).
        pool = self.pool
        pool._park(self, keep)
        if response is not None:
            self._ready = response
            self._hand_over()
        self._disown()
        pool._hand_on(self)

    def _release(self, keep: bool) -> None:
        self._disown()
        self.pool._release(self, keep)

    def _disown(self) -> None:
        owned = self._owned
        if owned is not None:
            # From here the connection may serve another call: cancelling this call's
            # (whole) body must not close it under that call.
            self._owned = None
            owned.on_cancel = None

    def _hand_over(self) -> None:
        response = self._ready
        if response is None:
            return
        self._ready = None
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(response)
            return
        on_head = self._on_head
        if on_head is not None:
            self._on_head = None
            on_head(response)

    # -- calls --
    def send(self, request: Request, authority: bytes, path: bytes, on_head: HeadCallback) -> None:
        """Send the call; `on_head` gets the response head, or the error that ended the call."""
        refused = self._write_request(request, authority, path)
        if refused is not None:
            self.pool._release(self, True)  # nothing was written: the next call's
            on_head(refused)
            return
        self._on_head = on_head
        self._by_future = False

    async def request(self, request: Request, authority: bytes, path: bytes) -> Response:
        refused = self._write_request(request, authority, path)
        if refused is not None:
            self.pool._release(self, True)  # nothing was written: the next call's
            raise refused
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._waiter = waiter
        self._by_future = True
        try:
            return await waiter
        except asyncio.CancelledError:
            self._cancel()
            raise

    def _write_request(self, request: Request, authority: bytes, path: bytes) -> BadRequest | None:
        """Write the request head (and a whole body); the error, having written nothing,
        if the head would not read back as this one request (see h1head)."""
        method = request.method
        parts = [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
        declared_length: bytes | None = None
        kinds = KINDS
        for name, value in request.headers:
            try:
                kind = kinds[name]
            except KeyError:
                kind = kind_of(name)
            if kind:  # the writer frames the request itself; or not a token
                if kind == LENGTH:
                    declared_length = value
                elif kind == BAD:
                    return self._refuse(request, authority, path)
                continue
            parts += (name, b": ", value, b"\r\n")
        # The request line, host, the fields (four parts each), a framing line, the blank.
        lines = (len(parts) - 6) // 4 + 4
        body = request.body
        data = b""
        chunked = False
        complete = body.complete
        if complete:
            trailers = body.trailers
            if trailers:
                # Trailers need the chunked coding, even for a body that is all here.
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n\r\n")
                data = body.read_nowait() or b""
                tail = _last_chunk(trailers)
                data = b"%x\r\n%s\r\n%s" % (len(data), data, tail) if data else tail
            else:
                data = body.read_nowait() or b""
                if data or method in _BODY_METHODS:
                    parts += (b"content-length: ", content_length(len(data)), b"\r\n")
                else:
                    lines -= 1
                parts.append(b"\r\n")
        elif declared_length is None:
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif declared_length.isdigit():
            parts += (b"content-length: ", declared_length, b"\r\n\r\n")
        else:
            return self._refuse(request, authority, path, "header 'content-length'")
        head = b"".join(parts)
        if not request_head_ok(head, lines, method, path, authority):
            return self._refuse(request, authority, path)
        self.uses += 1
        self._got_bytes = False
        self._request_sent = False
        self._head_request = method == b"HEAD"
        self._idempotent = method in _IDEMPOTENT
        transport = self.transport
        assert transport is not None
        transport.write(head + data if data else head)  # one copy of data, as a join
        if complete:
            self._request_sent = True
        else:
            length = -1 if chunked or declared_length is None else int(declared_length)
            self._sender = self.loop.create_task(self._send_body(body, length))
        return None

    def _refuse(
        self, request: Request, authority: bytes, path: bytes, what: str = ""
    ) -> BadRequest:
        what = what or bad_request_part(request.method, path, authority, request.headers)
        log.error(
            "refused to write a request to %s as HTTP/1.1: its %s holds bytes HTTP/1.1 "
            "does not allow there (CR, LF, NUL, a control byte or a space)",
            self.pool.service,
            what,
        )
        return BadRequest(
            f"the request's {what} cannot be sent as HTTP/1.1 (CR, LF, NUL, a control byte "
            "or a space where HTTP/1.1 does not allow one)",
            service=self.pool.service,
        )

    async def _send_body(self, body: Body, length: int) -> None:
        """Stream the rest of the body: chunked (`length` -1) or exactly `length` bytes."""
        transport = self.transport
        assert transport is not None
        chunked = length < 0
        try:
            while True:
                chunk = await body.read()
                if not chunk:
                    break
                if chunked:
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    length -= len(chunk)
                    if length < 0:
                        # More than the declared length: the rest would read as another
                        # request. The app's call is void.
                        log.error("request body to %s over its content-length", self.pool.service)
                        self.close()
                        return
                    transport.write(chunk)
                if self._write_paused:
                    self._drain = self.loop.create_future()
                    await self._drain
                    if self.closed:
                        return
            if chunked:
                transport.write(_last_chunk(body.trailers) if body.trailers else b"0\r\n\r\n")
            elif length:
                log.error("request body to %s short of its content-length", self.pool.service)
                self.close()
                return
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
        self._waiter = None
        self._on_head = None
        self._ready = None
        self._body = None
        self.close()

    abandon = _cancel

    def _lost(self, error: MeshError) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.fail(error)
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        on_head, self._on_head = self._on_head, None
        if on_head is not None:
            on_head(error)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


def _field_bytes(fields: Headers) -> int:
    """What `fields` took on the wire, near enough for a limit (name, value, `: `, CRLF)."""
    return sum(len(name) + len(value) + 4 for name, value in fields)


def _last_chunk(trailers: Headers) -> bytes:
    block = last_chunk(trailers)
    if block is None:
        log.error("dropped request trailers: %r cannot be written as HTTP/1.1", bad_field(trailers))
        return b"0\r\n\r\n"
    return block


class Ticket:
    """A call waiting for a connection to `endpoint` until `deadline` (loop time)."""

    __slots__ = ("deadline", "endpoint", "give", "key", "opening")

    def __init__(self, endpoint: Endpoint, deadline: float, give: ConnCallback) -> None:
        self.endpoint = endpoint
        self.key = (endpoint.host, endpoint.port)
        self.deadline = deadline
        self.give: ConnCallback | None = give  # None once the caller gave up
        self.opening: asyncio.Task[tuple[Any, H1ClientConnection]] | None = None


# How a pool opens a connection: loop.create_connection's shape (injected in tests).
Connect = Callable[
    [Callable[[], H1ClientConnection], str, int],
    Coroutine[Any, Any, tuple[asyncio.BaseTransport, H1ClientConnection]],
]


class H1Pool:
    """Keep-alive HTTP/1.1 connections, one call at a time each (to the local app)."""

    protocol = "http1"

    def __init__(
        self,
        service: str,
        limits: PoolLimits,
        metrics: Metrics,
        connect: Connect | None = None,
        max_header_bytes: int = 65536,
    ) -> None:
        self.service = service
        self.limits = limits
        # A response head, and its trailers apart, may hold this much (limits.max_header_bytes).
        self.max_header_bytes = max_header_bytes
        self.loop = asyncio.get_running_loop()
        self._connect: Connect = connect or self.loop.create_connection
        self._idle: dict[tuple[str, int], list[H1ClientConnection]] = {}
        self._all: set[H1ClientConnection] = set()
        self._connecting = 0
        self._waiters: deque[Ticket] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._sweeper: asyncio.TimerHandle | None = None
        self._metrics = PoolMetrics(metrics, service, self.protocol)

    # -- the coroutine path --
    async def request(
        self, endpoint: Endpoint, request: Request, authority: bytes, path: bytes
    ) -> Response:
        conn = self.idle_connection(endpoint)
        if conn is None:
            conn = await self._acquire(endpoint)
        self._metrics.stream()
        return await conn.request(request, authority, path)

    async def _acquire(self, endpoint: Endpoint) -> H1ClientConnection:
        waiter: asyncio.Future[H1ClientConnection] = self.loop.create_future()
        ticket = self.acquire(endpoint, partial(self._settle, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            self.abandon(ticket)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.put_back(waiter.result())  # handed over as the caller went away
            raise

    def _settle(
        self, waiter: asyncio.Future[H1ClientConnection], got: H1ClientConnection | Exception
    ) -> None:
        if waiter.done():
            if isinstance(got, H1ClientConnection):
                self.put_back(got)  # its caller was cancelled meanwhile
        elif isinstance(got, H1ClientConnection):
            waiter.set_result(got)
        else:
            waiter.set_exception(got)

    # -- the callback path --
    def idle_connection(self, endpoint: Endpoint) -> H1ClientConnection | None:
        """An idle connection to `endpoint`, unless calls are waiting for one."""
        key = (endpoint.host, endpoint.port)
        idle = self._idle.get(key)
        if idle and not (self._waiters and self._queued(key)):
            while idle:
                conn = idle.pop()  # most recently used: least likely closed by the app
                if not conn.closed:
                    return conn
        return None

    def _queued(self, key: tuple[str, int]) -> bool:
        return any(ticket.key == key for ticket in self._waiters)

    def acquire(self, endpoint: Endpoint, give: ConnCallback) -> Ticket:
        """For a call that found no idle connection: open one if the pool has room, else
        wait for one (at most `pending_timeout`); `give` gets it, or the error."""
        ticket = Ticket(endpoint, self.loop.time() + self.limits.pending_timeout, give)
        if self._waiters and self._queued(ticket.key):
            self._wait(ticket)  # behind the calls already waiting
        else:
            self._serve(ticket)
        return ticket

    def send(
        self,
        conn: H1ClientConnection,
        request: Request,
        authority: bytes,
        path: bytes,
        on_head: HeadCallback,
    ) -> None:
        self._metrics.stream()
        conn.send(request, authority, path, on_head)

    def put_back(self, conn: H1ClientConnection) -> None:
        """A connection handed to a call that had gone: the next call's."""
        self._release(conn, True)

    def abandon(self, ticket: Ticket) -> None:
        """The caller stopped waiting: leave the queue, stop the connect made for it."""
        ticket.give = None
        if ticket.opening is not None:
            ticket.opening.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(ticket)

    # -- handing out connections --
    def _serve(self, ticket: Ticket) -> None:
        """Look (again) for a connection for a waiting call."""
        give = ticket.give
        if give is None:
            return
        idle = self._idle.get(ticket.key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                ticket.give = None
                give(conn)
                return
        limits = self.limits
        if len(self._all) + self._connecting < limits.max_connections:
            self._open(ticket)
            return
        if self.loop.time() >= ticket.deadline:
            ticket.give = None
            give(
                PoolExhausted(
                    f"all {limits.max_connections} connections to {ticket.endpoint.address} "
                    f"busy for {limits.pending_timeout}s",
                    service=self.service,
                )
            )
            return
        self._wait(ticket)

    def _wait(self, ticket: Ticket) -> None:
        self._waiters.append(ticket)
        self._arm(ticket.deadline)

    def _arm(self, deadline: float) -> None:
        """The expiry timer fires by `deadline` (one timer for every waiting call)."""
        if self._expiry is not None:
            if self._expiry_at <= deadline:
                return
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Calls whose wait ran out look once more, then fail (PoolExhausted)."""
        self._expiry = None
        now = self.loop.time()
        waiters = self._waiters
        expired = [t for t in waiters if t.deadline <= now]
        for ticket in expired:
            waiters.remove(ticket)
        for ticket in expired:
            self._serve(ticket)
        if waiters:
            self._arm(min(t.deadline for t in waiters))

    def _open(self, ticket: Ticket) -> None:
        self._connecting += 1
        endpoint = ticket.endpoint
        key = ticket.key
        connect = self._connect(lambda: H1ClientConnection(self, key), endpoint.host, endpoint.port)
        task = self.loop.create_task(asyncio.wait_for(connect, self.limits.connect_timeout))
        ticket.opening = task
        task.add_done_callback(partial(self._opened, ticket))

    def _opened(self, ticket: Ticket, task: asyncio.Task[tuple[Any, H1ClientConnection]]) -> None:
        self._connecting -= 1
        ticket.opening = None
        give = ticket.give
        ticket.give = None
        if task.cancelled():
            self._slot_freed()
            return
        exc = task.exception()
        if exc is not None:
            if give is not None:
                if isinstance(exc, (OSError, TimeoutError)):
                    exc = UpstreamConnectError(
                        f"cannot connect to {ticket.endpoint.address}: {exc or 'timed out'}",
                        service=self.service,
                    )
                # Its caller first (a resend may take the slot), as when it connected itself.
                give(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            self._slot_freed()
            return
        conn = task.result()[1]
        self._all.add(conn)
        self._metrics.opened()
        if give is not None:
            give(conn)
        else:
            self.put_back(conn)  # opened for a call that went away

    def _release(self, conn: H1ClientConnection, keep: bool) -> None:
        self._park(conn, keep)
        self._hand_on(conn)

    def _park(self, conn: H1ClientConnection, keep: bool) -> None:
        """Take a connection back: idle, or closed if it cannot serve another call."""
        if conn not in self._all:
            return
        if not keep or conn.closed:
            conn.close()  # the slot frees when the connection is lost
            return
        conn.last_active = self.loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.limits.idle_timeout, self._sweep)

    def _hand_on(self, conn: H1ClientConnection) -> None:
        """A connection just parked goes to the oldest call waiting for its endpoint."""
        waiters = self._waiters
        if not waiters:
            return
        key = conn.key
        idle = self._idle.get(key)
        if not idle or idle[-1] is not conn or conn.closed:
            return  # taken or closed meanwhile
        for i, ticket in enumerate(waiters):
            # Every ticket queued has a caller (abandon() and _serve() take theirs out).
            if ticket.key == key and ticket.give is not None:
                del waiters[i]
                idle.pop()
                give = ticket.give
                ticket.give = None
                give(conn)
                return

    def _remove(self, conn: H1ClientConnection) -> bool:
        """Forget a lost connection; False if the pool no longer knew it."""
        if conn not in self._all:
            return False
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._metrics.closed(conn.uses)
        return True

    def _slot_freed(self) -> None:
        """Room for one more connection: the oldest waiting call opens it."""
        waiters = self._waiters
        if waiters and len(self._all) + self._connecting < self.limits.max_connections:
            self._serve(waiters.popleft())

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
