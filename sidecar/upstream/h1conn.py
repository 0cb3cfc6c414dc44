"""One HTTP/1.1 client connection to the local app: the asyncio adapter around
proto/h1client's Sans-IO core (which parses responses), writing requests with
proto/h1write. It carries one call at a time and hands the response head to whoever
waits for it, a callback (`send()`, the proxy's callback path) or a future (`send()`
without one, the coroutine path), once the bytes that carried it are parsed (the body is
then often whole already): a waiting task hears of it before the owner takes the
connection back, a callback after the owner took it back but before another call may
have it. What it tells its owner (the pool, h1pool.py) is the `ConnectionOwner`
protocol, and only that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Protocol, cast

from sidecar.errors import BadRequest, MeshError, StreamRefused, UpstreamReset
from sidecar.messages import Body, BodyError, Headers, Request, Response
from sidecar.proto.h1client import ClientCore
from sidecar.proto.h1head import bad_field, last_chunk
from sidecar.proto.h1write import Unwritable, encode_request

log = logging.getLogger("sidecar.upstream")

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# What a call waiting for a response head is told: the head, or why there is none.
HeadCallback = Callable[[Response | MeshError], None]


class ConnectionOwner(Protocol):
    """What a connection tells the pool that holds it (H1Pool), in the order it does."""

    service: str  # for the connection's logs and errors
    max_header_bytes: int  # a response head, and its trailers apart, may hold this much

    def release(self, conn: H1ClientConnection, keep: bool) -> None:
        """The call is through with `conn`: park it, then hand it on."""

    def park(self, conn: H1ClientConnection, keep: bool) -> None:
        """Take `conn` back (idle, or closed unless `keep`); no call gets it yet."""

    def hand_on(self, conn: H1ClientConnection) -> None:
        """`conn`, parked, may go to a call waiting for one."""

    def lost(self, conn: H1ClientConnection) -> bool:
        """`conn` closed: forget it; False if it was forgotten already."""

    def slot_freed(self) -> None:
        """A lost connection's call has heard of it: its slot may be used again."""


class H1ClientConnection(asyncio.Protocol):
    def __init__(self, owner: ConnectionOwner, key: tuple[str, int]) -> None:
        self.owner = owner
        self.core = ClientCore(self, owner.max_header_bytes)
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.uses = 0
        self.last_active = 0.0
        # Who waits for the response head: a callback (send() with on_head) or a future.
        self._waiter: asyncio.Future[Response] | None = None
        self._on_head: HeadCallback | None = None
        self._ready: Response | None = None  # a head parsed, not yet handed over
        self._by_future = False
        self._owned: Body | None = None  # the current call's response body
        self._method = b""  # the current call's
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
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: no socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reason = self.core.receive(data)
        if self._ready is not None:
            self._hand_over()  # the body goes on arriving after the head
        if reason is not None:
            self._refused(reason)

    def _refused(self, reason: str) -> None:
        self._hand_over()
        self._lost(UpstreamReset(f"HTTP/1.1 response from the app refused: {reason}"))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        # Out of the pool's count before the call hears of it, so a resend finds the slot.
        known = owner.lost(self)
        if self._waiter is not None or self._on_head is not None or self.core.body is not None:
            reused = self.uses > 1
            if not self.core.got_bytes and reused and self._method in _IDEMPOTENT:
                # A kept-alive connection the app had already closed: nothing was processed.
                self._lost(StreamRefused("the app closed a kept-alive connection"))
            else:
                self._lost(UpstreamReset("the app closed the connection mid-call"))
        self._wake_drain()
        if known:
            owner.slot_freed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- what the core tells the connection (proto.h1client.ClientEvents) --
    def response_received(self, status: int, headers: Headers, no_body: bool) -> Body:
        body = Body(replayable=False)
        body.on_consumed = self._on_consumed
        body.on_cancel = self._on_cancel
        self._owned = body
        if no_body:
            body.finish()
            # httptools cannot be told a HEAD response has no body: do not reuse.
            if self.core.head_request:
                self.close()
        self._ready = Response(status, headers, body)
        return body

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def response_complete(self, keep: bool) -> None:
        if self._by_future:
            # The waiting task hears of the response on its next step; the pool takes
            # the connection back after that step, as when the task woke first.
            self._hand_over()
            self.loop.call_soon(self._release, keep)
            return
        response = self._ready
        self._ready = None
        if response is None or self.closed:
            # Handed over already (its body was still arriving then), or the connection
            # is closing (a HEAD): nothing to wait for, and nothing must come first.
            self._conclude(response, keep)
            return
        # Handed over once the loop has read what else arrived this turn, as a waiting
        # task would hear of it: responses then go out in a batch (less CPU here).
        self.loop.call_soon(self._conclude, response, keep)

    def _conclude(self, response: Response | None, keep: bool) -> None:
        # The pool takes the connection back first (the call's next step may be the next
        # pipelined request, which may use it), but hands it to a call waiting for one
        # only once this call is through with its response (which may close it).
        owner = self.owner
        owner.park(self, keep)
        if response is not None:
            on_head = self._on_head  # (a waiting task heard of it in on_message_complete)
            if on_head is not None:
                self._on_head = None
                on_head(response)
        owned = self._owned
        if owned is not None:  # _disown, inline: this runs per call
            self._owned = None
            owned.on_cancel = None
        owner.hand_on(self)

    def _release(self, keep: bool) -> None:
        self._disown()
        self.owner.release(self, keep)

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
    def send(
        self, request: Request, authority: bytes, path: bytes, on_head: HeadCallback | None
    ) -> asyncio.Future[Response] | None:
        """Send the call. `on_head` gets the response head, or the error that ended the
        call; without `on_head`, the future returned gets them (a refused write raises)."""
        refused = self._write_request(request, authority, path)
        if refused is not None:
            self.owner.release(self, True)  # nothing was written: the next call's
            if on_head is None:
                raise refused
            on_head(refused)
            return None
        if on_head is None:
            waiter: asyncio.Future[Response] = self.loop.create_future()
            self._waiter = waiter
            self._by_future = True
            return waiter
        self._on_head = on_head
        self._by_future = False
        return None

    def _write_request(self, request: Request, authority: bytes, path: bytes) -> BadRequest | None:
        """Write the request head (and a whole body); the error, having written nothing,
        if the head would not read back as this one request (see proto/h1write)."""
        body = request.body
        complete = body.complete
        data = tail = None
        if complete:
            data = body.read_nowait() or b""
            trailers = body.trailers
            if trailers:
                tail = self._last_chunk(trailers)
        try:
            wire, left = encode_request(
                request.method, path, authority, request.headers, data, tail
            )
        except Unwritable as why:
            return self._refuse(str(why))
        self.uses += 1
        core = self.core
        core.got_bytes = False
        core.request_sent = complete
        core.head_request = request.method == b"HEAD"
        self._method = request.method
        transport = self.transport
        assert transport is not None
        transport.write(wire)
        if not complete:
            self._sender = self.loop.create_task(self._send_body(body, left))
        return None

    def _refuse(self, what: str) -> BadRequest:
        why = f"the request's {what} cannot be sent as HTTP/1.1 (CR, LF, NUL, a control byte"
        log.error("refused to write a request to %s: %s or a space)", self.owner.service, why)
        why += " or a space where HTTP/1.1 does not allow one)"
        return BadRequest(why, service=self.owner.service)

    def _last_chunk(self, trailers: Headers) -> bytes:
        block = last_chunk(trailers)
        if block is None:
            log.error(
                "dropped request trailers to %s: %r cannot be written as HTTP/1.1",
                self.owner.service,
                bad_field(trailers),
            )
            return b"0\r\n\r\n"
        return block

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
                        # More: the rest would read as another request. The call is void.
                        log.error("request body to %s over its content-length", self.owner.service)
                        self.close()
                        return
                    transport.write(chunk)
                if self._write_paused:
                    self._drain = self.loop.create_future()
                    await self._drain
                    if self.closed:
                        return
            if chunked:
                trailers = body.trailers
                transport.write(self._last_chunk(trailers) if trailers else b"0\r\n\r\n")
            elif length:
                log.error("request body to %s short of its content-length", self.owner.service)
                self.close()
                return
            self.core.request_sent = True
        except BodyError:
            self.close()  # the caller went away mid-body: the app's call is void

    def _consumed(self, size: int) -> None:
        if self.core.may_resume():
            self.core.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _cancel(self) -> None:
        """The caller gave up on the response: the connection cannot be reused."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        self._waiter = None
        self._on_head = None
        self._ready = None
        self.core.body = None
        self.close()

    abandon = _cancel

    def _lost(self, error: MeshError) -> None:
        body, self.core.body = self.core.body, None
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
