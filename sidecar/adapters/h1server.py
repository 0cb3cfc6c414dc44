"""HTTP/1.1 server side of a listener, on httptools (llhttp).

One request is handled at a time per connection; pipelined requests queue and
reading pauses until the current response is written. The response is streamed
with the transport's write backpressure.

A request starts once the bytes that carried its head are parsed, so a small body is
usually whole by then. The listener's handler may then take the call on callbacks
(`ListenerContext.start_now`, the proxy's callback path), ending it with `sink.done()`
or handing the rest to a task with `sink.spawn()`; otherwise (or when it declines) a
task per call runs the handler's coroutine.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import httptools

from sidecar.clock import Timer, Timers
from sidecar.errors import error_body
from sidecar.messages import HOP_BY_HOP, Body, BodyError, Headers, Request, Response
from sidecar.proto.fields import field_bytes
from sidecar.proto.h1head import FRAMING_FIELDS, bad_field, last_chunk
from sidecar.proto.h1write import CHUNKED, encode_response_head, status_line
from sidecar.serving import TaskWork

if TYPE_CHECKING:
    from sidecar.serving import ListenerContext, RunningCall

# Buffered request body above which the connection stops reading from the client.
_READ_HIGH_WATER = 256 * 1024
_READ_LOW_WATER = 64 * 1024

# What the connection's one timer is waiting for (limits.<kind>_timeout).
_HEADER, _BODY, _IDLE = "header", "body", "idle"

_INVALID_BODY = b'{"error":"the response had an invalid header","status":500}'
_INVALID_RESPONSE = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_INVALID_BODY), _INVALID_BODY)
)


class _ParseAbort(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class H1ServerProtocol(asyncio.Protocol):
    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.timers: Timers = ctx.timers if ctx.timers is not None else self.loop  # deadlines
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        limits = ctx.limits
        self._max_request_line = limits.max_request_line
        self._max_header_bytes = limits.max_header_bytes
        self._header_read_timeout = limits.header_read_timeout
        self._body_read_timeout = limits.body_read_timeout
        self._idle_timeout = limits.idle_timeout
        self._tick = ctx.timer_tick
        self._url = b""
        # The fields being parsed, hop-by-hop ones already set aside: the head's, then
        # (a new list, once the head is a Request) the trailers', a block of their own.
        # Empty between requests.
        self._headers: Headers = []
        self._host: bytes | None = None
        self._connection_tokens: list[bytes] | None = None
        # limits.max_header_bytes: the bytes read while a head is incomplete are counted
        # (a sum per read, not per field); a head is counted exactly, field by field, only
        # when those bytes went over the limit (they may hold the request line, or a body
        # after the head). Past the limit by more than a request line could explain, a head
        # still arriving is refused there and then. Trailers are counted field by field,
        # as they arrive: a block of their own under the same limit.
        self._head_read = 0
        self._head_read_max = limits.max_header_bytes + limits.max_request_line + 4096
        self._hop_bytes = 0  # the head's hop-by-hop fields, which _headers does not hold
        self._header_bytes = 0  # the trailers' so far
        # One timer per connection, for whichever deadline is running: the head's, the
        # body's next byte, keep-alive idle. Setting a deadline is a store; the timer,
        # armed at the first head, sleeps at most ctx.timer_tick and re-arms until the
        # connection closes (never once per request). It tells a call's turn from the
        # client's by the connection's state, so no store marks the call's turn.
        self._header_deadline = 0.0  # loop time; 0 while no head is being read
        self._deadline = 0.0  # the body's next byte or idle's end (`_deadline_kind`)
        self._deadline_kind = _IDLE
        self._timer: Timer | None = None
        self._parsing: Request | None = None
        self._parsing_keep_alive = True
        self._queue: deque[tuple[Request, bool]] = deque()
        self._active: Request | None = None
        self._active_task: RunningCall | None = None
        # A request whose head arrived in the bytes being parsed: it starts after them.
        self._arrived: Request | None = None
        self._arrived_keep_alive = True
        self._starting = False
        self._next: tuple[Request, bool] | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._stopped_parsing = False
        self._close_after_active = False
        # Why the active request's own bytes turned out malformed after its call began:
        # its reply says that, whatever the call made of the broken body.
        self._refusal: tuple[int, str] | None = None
        self._on_consumed = self._body_consumed  # bound once, not per request

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped_parsing:
            return
        if self._parsing is None:
            self._head_read += len(data)  # a head on its way (or about to be)
        try:
            self.parser.feed_data(data)
        except _ParseAbort as abort:
            self._reject(abort.status, abort.reason)
        except httptools.HttpParserUpgrade:
            # A request with `Upgrade:` (curl --http2 sends `Upgrade: h2c`): the request
            # itself is answered as plain HTTP/1.1 (the upgrade header is hop-by-hop and
            # dropped); the connection then closes, as bytes after it are not HTTP/1.1.
            self._stopped_parsing = True
            if self._parsing is not None:
                self._parsing.body.finish()
                self._parsing = None
            self._close_after_active = True
            if self._active is None:
                self._reject(400, "protocol upgrades are not supported by this listener")
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; our own aborts carry their status.
            cause = exc.__context__
            if isinstance(cause, _ParseAbort):
                self._reject(cause.status, cause.reason)
            else:
                self._reject(400, f"malformed HTTP/1.1 request: {exc}")
        if self._head_read > self._head_read_max and not self._stopped_parsing:
            self._reject(431, f"request headers over {self._max_header_bytes} bytes")
        if self._parsing is not None:
            # A body still on its way: the client's next byte is due in body_read_timeout.
            self._deadline = self.timers.time() + self._body_read_timeout
            self._deadline_kind = _BODY
        request = self._arrived
        if request is not None:
            self._arrived = None
            if self.ctx.start_now is not None and request.body.complete:
                # Started once the loop has read what else arrived this turn, as a task's
                # first step would be: calls then go upstream in a batch, which costs
                # less CPU here (in user and system time) than a write per read.
                self.loop.call_soon(self._start_later, request, self._arrived_keep_alive)
            else:
                self._start(request, self._arrived_keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.ctx.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._parsing is not None:
            self._parsing.body.fail(ConnectionResetError("client closed the connection"))
        for request, _ in self._queue:
            request.body.fail(ConnectionResetError("client closed the connection"))
        self._queue.clear()
        if self._active_task is not None and not self._active_task.done():
            self._active_task.cancel()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._url = b""
        self._host = None
        self._connection_tokens = None
        self._hop_bytes = 0
        self._header_bytes = 0
        now = self.timers.time()
        self._header_deadline = now + self._header_read_timeout
        if self._timer is None:
            self._timer = self.timers.call_at(now + self._tick, self._on_timer)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_request_line:
            raise _ParseAbort(414, f"request target over {self._max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in HOP_BY_HOP:
            if self._parsing is not None:  # past the head: a trailer
                _refuse_trailer(name)
            self._hop_bytes += len(name) + len(value) + 4
            if name == b"host":
                if self._host is not None:
                    raise _ParseAbort(400, "a request may have one Host header, not two")
                self._host = value
            elif name == b"transfer-encoding":
                _check_transfer_coding(value)
            elif name == b"connection":
                # The headers the last Connection header names go too (hop-by-hop ones,
                # such as keep-alive, are gone already).
                tokens = [t.strip().lower() for t in value.split(b",")]
                self._connection_tokens = [t for t in tokens if t not in HOP_BY_HOP]
            return
        if name == b"te":
            if self._parsing is not None:
                _refuse_trailer(name)
            if value.strip().lower() != b"trailers":
                self._hop_bytes += len(name) + len(value) + 4  # dropped, as hop-by-hop ones
                return
        self._headers.append((name, value))
        if self._parsing is not None:  # a trailer
            self._header_bytes += len(name) + len(value) + 4
            if self._header_bytes > self._max_header_bytes:
                raise _ParseAbort(431, f"request trailers over {self._max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._header_deadline = 0.0
        if self._head_read > self._max_header_bytes and (
            self._hop_bytes + field_bytes(self._headers) > self._max_header_bytes
        ):
            raise _ParseAbort(431, f"request headers over {self._max_header_bytes} bytes")
        self._head_read = 0
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise _ParseAbort(501, "CONNECT is not supported by this listener")
        http10 = parser.get_http_version() == "1.0"
        if self._host is None and not http10:
            raise _ParseAbort(400, "an HTTP/1.1 request must have a Host header")
        request = self._build_request(method)
        self._headers = []  # for its trailers, if any
        self._parsing = request
        keep_alive = bool(parser.should_keep_alive())
        # HTTP/1.0 has no chunked coding: a streamed reply is ended by closing instead.
        if http10:
            request.protocol = "http1.0"
        if self._active is None:
            self._active = request
            self._arrived = request
            self._arrived_keep_alive = keep_alive
        else:
            self._queue.append((request, keep_alive))
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is None:
            return
        request.body.feed(body)
        if request.body.buffered > _READ_HIGH_WATER:
            self._pause_reading()

    def on_message_complete(self) -> None:
        trailers = self._headers
        if trailers:
            self._headers = []
            for name, _ in trailers:
                if name in FRAMING_FIELDS:
                    _refuse_trailer(name)
        request = self._parsing
        if request is not None:
            request.body.finish(trailers)
            self._parsing = None

    # -- requests --
    def _build_request(self, method: bytes) -> Request:
        url = self._url
        headers = self._headers
        authority = self._host or b""
        connection_tokens = self._connection_tokens
        if connection_tokens:
            drop = set(connection_tokens)
            headers = [(n, v) for n, v in headers if n not in drop]
        absolute = False
        path = url
        if url[:1] != b"/" and url != b"*":
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError as exc:
                raise _ParseAbort(400, f"invalid request target: {exc}") from None
            if parsed.host:
                host = b"[%s]" % parsed.host if b":" in parsed.host else parsed.host
                authority = host if parsed.port is None else b"%s:%d" % (host, parsed.port)
            path = parsed.path or b"/"
            if parsed.query:
                path += b"?" + parsed.query
            absolute = True
        body = Body()
        body.on_consumed = self._on_consumed
        return Request(
            method,
            path,
            authority,
            headers,
            body,
            protocol="http1",
            peer=self.peer,
            start=time.monotonic(),
            absolute_form=absolute,
        )

    def _start_later(self, request: Request, keep_alive: bool) -> None:
        if not self._closed:  # a task cancelled before its first step never runs either
            self._start(request, keep_alive)

    def _start(self, request: Request, keep_alive: bool) -> None:
        self._active = request
        if self._starting:
            # A call that ended before its start returned is starting the next one:
            # the loop below does it, so pipelined calls never nest.
            self._next = (request, keep_alive)
            return
        self._starting = True
        try:
            while True:
                self._launch(request, keep_alive)
                following = self._next
                if following is None:
                    break
                self._next = None
                request, keep_alive = following
        finally:
            self._starting = False

    def _launch(self, request: Request, keep_alive: bool) -> None:
        ctx = self.ctx
        sink = _H1Sink(self, request, keep_alive)
        start_now = ctx.start_now
        if start_now is not None and request.body.complete:
            ctx.in_flight += 1
            try:
                call = start_now(request, sink)
            except Exception:
                sink.crashed()  # as a handler raising in its task would
                return
            if isinstance(call, TaskWork):
                # Routed already: its task runs the rest (counted in flight already).
                self._active_task = self.loop.create_task(self._run(request, sink, call.work))
                return
            if call is not None:
                if not call.done():
                    self._active_task = call
                return
            ctx.in_flight -= 1
        self._active_task = self.loop.create_task(self._run(request, sink, None))

    async def _run(
        self, request: Request, sink: _H1Sink, work: Callable[[], Awaitable[None]] | None
    ) -> None:
        """One call's task: the handler's coroutine, or (`work`) the rest of a call that
        began on callbacks and was counted in flight then."""
        ctx = self.ctx
        if work is None:
            ctx.in_flight += 1
        try:
            await (ctx.handler(request, sink) if work is None else work())
        except asyncio.CancelledError:
            pass
        except BodyError:
            # The upstream failed mid-response: the only honest signal left is to close.
            if self.transport is not None:
                self.transport.close()
        except Exception:
            ctx.log.exception("unhandled error in %s handler", ctx.name)
            if self.transport is not None:
                self.transport.close()
        finally:
            self._call_done(request, sink.keep_alive)

    def _call_done(self, request: Request, keep_alive: bool) -> None:
        ctx = self.ctx
        ctx.in_flight -= 1
        if ctx.in_flight == 0:
            ctx.idle.set()
        self._finish(request, keep_alive)

    def _finish(self, request: Request, keep_alive: bool) -> None:
        self._active = None
        self._active_task = None
        transport = self.transport
        if self._closed or transport is None:
            return
        if (
            not keep_alive
            or self._close_after_active
            or self.ctx.draining
            or transport.is_closing()
        ):
            transport.close()
            return
        # Whatever the handler left unread of the request body is read and dropped.
        request.body.discard()
        if self._queue:
            next_request, next_keep_alive = self._queue.popleft()
            self._start(next_request, next_keep_alive)
        if (
            not self._queue
            and self._reading_paused
            and (self._parsing is None or self._parsing.body.buffered < _READ_LOW_WATER)
        ):
            self._resume_reading()
        if self._parsing is None:
            # Idle from now (the timer tells a pipelined request's call from idling).
            self._deadline = self.timers.time() + self._idle_timeout
            self._deadline_kind = _IDLE

    def _body_consumed(self, size: int) -> None:
        if self._reading_paused and not self._queue:
            parsing = self._parsing
            if parsing is None or parsing.body.buffered < _READ_LOW_WATER:
                self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            if self._deadline_kind == _BODY and self._deadline:
                # The wait was ours: the client's time for the next byte starts now.
                self._deadline = self.timers.time() + self._body_read_timeout
            self.transport.resume_reading()

    # -- timeouts --
    def head_began_at(self, first_byte: float) -> None:
        """The connection's first byte came in at `first_byte` (loop time), before this
        protocol was chosen: the first head's deadline counts from then."""
        deadline = first_byte + self._header_read_timeout
        if 0.0 < deadline < self._header_deadline:
            self._header_deadline = deadline
            if self._timer is not None:
                self._timer.cancel()  # it may sleep past this earlier deadline
            self._timer = self.timers.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self.timers.time()
        deadline, kind = self._header_deadline, _HEADER
        if not deadline:
            deadline, kind = self._deadline, self._deadline_kind
            if kind == _BODY:
                if self._parsing is None:
                    deadline = 0.0  # the body is whole: a call's turn, not the client's
                elif self._reading_paused:
                    deadline = self._deadline = now + self._body_read_timeout  # ours
            elif self._active is not None or self._parsing is not None or self._queue:
                deadline = 0.0  # a call's turn: not idle
        if not deadline or now < deadline:
            wake = now + self._tick
            self._timer = self.timers.call_at(
                min(deadline, wake) if deadline else wake, self._on_timer
            )
            return
        self._header_deadline = self._deadline = 0.0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.ctx.timed_out(kind, self.peer)
        if kind == _HEADER:
            self._reject(408, "request headers not received in time")
            return
        parsing = self._parsing
        if parsing is not None:
            # The call reading it (if any) sees why it ends; the close cancels the call.
            self._parsing = None
            parsing.body.fail(BodyError("request body not received in time"))
        self._stopped_parsing = True
        transport.close()

    def _reject(self, status: int, reason: str) -> None:
        """Answer a request the parser could not accept, then close the connection."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._stopped_parsing = True
        parsing = self._parsing
        if parsing is not None:
            # Its body can never be read whole now: whoever reads it gets an error.
            self._parsing = None
            parsing.body.fail(BodyError(f"malformed request body: {reason}"))
            if parsing is self._active:
                self._refusal = (status, reason)
        if self._active is not None:
            # The call in progress ends (with a reply if its request was whole; with an
            # error if this broke its body); then the connection closes.
            self._close_after_active = True
            return
        transport.write(_rejection(status, reason))
        transport.close()

    # -- writing --
    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("client closed the connection")
        if self._write_paused:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
            if self._closed:
                raise ConnectionResetError("client closed the connection")

    def close_if_idle(self) -> None:
        """Draining: close keep-alive connections that have no call in progress."""
        if self._active is None and self._parsing is None and self.transport is not None:
            self.transport.close()


def _refuse_trailer(name: bytes) -> None:
    # A recipient that merged it would frame or route by it (RFC 9110 6.5.1).
    raise _ParseAbort(400, f"a request trailer may not be {name.decode('latin-1')!r}")


def _check_transfer_coding(value: bytes) -> None:
    """Only `chunked`, last and once, frames a request body (RFC 9112 6.1, 6.3)."""
    codings = [coding.split(b";", 1)[0].strip().lower() for coding in value.split(b",")]
    if codings[-1] != b"chunked":
        raise _ParseAbort(400, "a request's transfer-encoding must end in chunked")
    for coding in codings[:-1]:
        if coding == b"chunked":
            raise _ParseAbort(400, "a request's transfer-encoding may name chunked once")
        raise _ParseAbort(
            501, f"transfer coding {coding.decode('latin-1')[:40]!r} is not implemented"
        )


def _rejection(status: int, reason: str) -> bytes:
    body, content_type = error_body(status, reason, spaced=True)
    return (
        status_line(status) + b"content-type: %s\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (content_type, len(body)) + body
    )


class _H1Sink:
    """Writes one response on an HTTP/1.1 connection; for a call run on callbacks, also
    how it ends (`done`, `crashed`) or goes on in a task (`spawn`)."""

    __slots__ = ("conn", "keep_alive", "request")

    def __init__(self, conn: H1ServerProtocol, request: Request, keep_alive: bool) -> None:
        self.conn = conn
        self.request = request
        self.keep_alive = keep_alive

    def _head(
        self, response: Response, no_body: bool, data: bytes | None
    ) -> tuple[bytes, bool, int]:
        """The response head, whether the body goes chunked and, for a body streamed
        under the response's own content-length, that length (else -1); `data` is the
        whole body when it is all here. Raises Unwritable (see proto/h1write)."""
        head, left, self.keep_alive = encode_response_head(
            response.status,
            response.headers,
            data,
            not no_body and data is None,
            self.keep_alive and not self.conn.ctx.draining,
            self.request.protocol == "http1.0",
        )
        return head, left == CHUNKED, left if left >= 0 else -1

    def _refuse(self, transport: asyncio.Transport, response: Response, why: ValueError) -> int:
        response.body.cancel()
        self.keep_alive = False
        bad = bad_field(response.headers)
        self.conn.ctx.log.error(
            "refused to write a response: %s%s",
            why,
            ""
            if bad is None
            else f" ({bad.decode('latin-1')[:64]!r} holds CR, LF, NUL, "
            "a control byte or is not a token)",
        )
        transport.write(_INVALID_RESPONSE)
        return 0

    def send_now(self, response: Response) -> int | None:
        """Write the whole response if its body is all here (returns the body bytes
        written); None, having written nothing, when the body must be streamed."""
        conn = self.conn
        transport = conn.transport
        if transport is None or conn._closed:
            raise ConnectionResetError("client closed the connection")
        refusal = conn._refusal
        if refusal is not None:
            # The request turned out malformed after its call began: say so, and close.
            response.body.cancel()
            self.keep_alive = False
            transport.write(_rejection(*refusal))
            return 0
        status = response.status
        body = response.body
        no_body = status < 200 or status == 204 or status == 304 or self.request.method == b"HEAD"
        if no_body:
            data = None
        elif body.complete:
            data = body.read_nowait() or b""
        else:
            return None
        try:
            head, _, self.keep_alive = encode_response_head(
                status,
                response.headers,
                data,
                False,
                self.keep_alive and not conn.ctx.draining,
                self.request.protocol == "http1.0",
            )
        except ValueError as why:
            return self._refuse(transport, response, why)
        if data is None:
            body.cancel()
            transport.write(head)
            return 0
        transport.write(head + data if data else head)
        return len(data)

    async def send(self, response: Response) -> int:
        sent = self.send_now(response)
        if sent is not None:
            return sent
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        body = response.body
        try:
            head, chunked, length = self._head(response, False, None)
        except ValueError as why:
            return self._refuse(transport, response, why)
        sent = 0
        transport.write(head)
        while True:
            chunk = await body.read()
            if not chunk:
                break
            sent += len(chunk)
            if chunked:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif length >= 0 and sent > length:
                # More than its content-length: the rest would read as another response.
                conn.ctx.log.error("response body over its content-length: connection closed")
                body.cancel()
                transport.close()
                return sent - len(chunk)
            else:
                transport.write(chunk)
            if conn._write_paused:
                await conn.drain()
        if chunked:
            trailers = body.trailers
            transport.write(self._last_chunk(trailers) if trailers else b"0\r\n\r\n")
        elif length >= 0 and sent != length:
            conn.ctx.log.error("response body short of its content-length: connection closed")
            transport.close()
        return sent

    def _last_chunk(self, trailers: Headers) -> bytes:
        """The last chunk and the trailers, checked as a head's fields are; trailers that
        would not read back as these fields are dropped (and logged), never written."""
        block = last_chunk(trailers)
        if block is not None:
            return block
        bad = bad_field(trailers)
        self.conn.ctx.log.error("dropped response trailers: %r cannot be written as HTTP/1.1", bad)
        return b"0\r\n\r\n"

    # -- a call run on callbacks --
    def done(self) -> None:
        """The call ended: the connection takes the next request."""
        self.conn._call_done(self.request, self.keep_alive)

    def crashed(self) -> None:
        """The call's code raised (logged here): close the connection, as a task would."""
        conn = self.conn
        conn.ctx.log.exception("unhandled error in %s handler", conn.ctx.name)
        if conn.transport is not None:
            conn.transport.close()
        self.done()

    def spawn(self, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Go on in a task (streaming a body, waiting for a connection): `work` runs as a
        handler's coroutine would, and its end ends the call."""
        conn = self.conn
        return conn.loop.create_task(conn._run(self.request, self, work))
