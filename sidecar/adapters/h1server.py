"""HTTP/1.1 server side of a listener: the asyncio adapter around proto/h1server's
Sans-IO core (which parses, on httptools, and keeps the connection's states and
deadlines). This holds the transport, the one timer, and the calls' tasks.

One request is handled at a time per connection; pipelined requests queue (in the
core) and reading pauses until the current response is written. The response is
streamed with the transport's write backpressure (h1sink.py).

A request starts once the bytes that carried its head are parsed, so a small body is
usually whole by then. The listener's handler may then take the call on callbacks
(`ListenerContext.start_now`, the proxy's callback path), ending it with `sink.done()`
or handing the rest to a task with `sink.spawn()`; otherwise (or when it declines) a
task per call runs the handler's coroutine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from sidecar.adapters.h1sink import H1Sink, rejection
from sidecar.clock import Timer, Timers
from sidecar.messages import Body, BodyError, Headers, Request
from sidecar.proto.h1server import HEADER, ServerCore
from sidecar.serving import TaskWork

if TYPE_CHECKING:
    from sidecar.serving import ListenerContext, RunningCall

_rejection = rejection  # its old name (tests/unit/test_errors.py)


class H1ServerProtocol(asyncio.Protocol):
    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.timers: Timers = ctx.timers if ctx.timers is not None else self.loop  # deadlines
        self.core: ServerCore[Request] = ServerCore(self, ctx.limits, ctx.timer_tick, BodyError)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        # One timer per connection, for whichever deadline the core keeps: armed at the
        # first head, it sleeps at most ctx.timer_tick and re-arms until the connection
        # closes (never once per request); setting a deadline is a store in the core.
        self._timer: Timer | None = None
        self._active_task: RunningCall | None = None
        self._starting = False
        self._next: tuple[Request, bool] | None = None
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self._on_consumed = self._body_consumed  # bound once, not per request

    # The core's state, under the names the unit tests look at.
    @property
    def _active(self) -> Request | None:
        return self.core.active

    @property
    def _header_deadline(self) -> float:
        return self.core.header_deadline

    @_header_deadline.setter
    def _header_deadline(self, when: float) -> None:
        self.core.header_deadline = when

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        now = self.timers.time()
        request = self.core.receive(data, now)
        if self._timer is None and not self.closed:
            self._timer = self.timers.call_at(now + self.core.tick, self._on_timer)
        if request is not None:
            if self.ctx.start_now is not None and request.body.complete:
                # Started once the loop has read what else arrived this turn, as a task's
                # first step would be: calls then go upstream in a batch, which costs
                # less CPU here (in user and system time) than a write per read.
                self.loop.call_soon(self._start, request, self.core.arrived_keep_alive)
            else:
                self._start(request, self.core.arrived_keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.core.lost(ConnectionResetError("client closed the connection"))
        if self._active_task is not None and not self._active_task.done():
            self._active_task.cancel()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # -- what the core asks of the adapter (proto.h1server.ServerEvents) --
    def request_received(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        absolute: bool,
        http10: bool,
    ) -> Request:
        body = Body()
        body.on_consumed = self._on_consumed
        return Request(
            method,
            target,
            authority,
            headers,
            body,
            # HTTP/1.0 has no chunked coding: a streamed reply is ended by closing instead.
            protocol="http1.0" if http10 else "http1",
            peer=self.peer,
            start=time.monotonic(),
            absolute_form=absolute,
        )

    def refuse(self, status: int, reason: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(rejection(status, reason))
            transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    # -- requests --
    def _start(self, request: Request, keep_alive: bool) -> None:
        if self.closed:  # a task cancelled before its first step never runs either
            return
        self.core.active = request
        if self._starting:
            # A call that ended before its start returned is starting the next one:
            # the loop below does it, so pipelined calls never nest.
            self._next = (request, keep_alive)
            return
        self._starting = True
        ctx = self.ctx
        try:
            while True:
                sink = H1Sink(self, request, keep_alive)
                start_now = ctx.start_now
                in_task = True
                if start_now is not None and request.body.complete:
                    ctx.in_flight += 1
                    try:
                        call = start_now(request, sink)
                    except Exception:
                        sink.crashed()  # as a handler raising in its task would
                        in_task = False
                    else:
                        if isinstance(call, TaskWork):
                            # Routed already: its task runs the rest (in flight already).
                            work = self.run(request, sink, call.work)
                            self._active_task = self.loop.create_task(work)
                            in_task = False
                        elif call is not None:
                            if not call.done():
                                self._active_task = call
                            in_task = False
                        else:
                            ctx.in_flight -= 1  # declined: the handler's task runs it
                if in_task:
                    self._active_task = self.loop.create_task(self.run(request, sink, None))
                following = self._next
                if following is None:
                    break
                self._next = None
                request, keep_alive = following
        finally:
            self._starting = False

    async def run(
        self, request: Request, sink: H1Sink, work: Callable[[], Awaitable[None]] | None
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
            self.call_done(request, sink.keep_alive)

    def call_done(self, request: Request, keep_alive: bool) -> None:
        ctx = self.ctx
        ctx.in_flight -= 1
        if ctx.in_flight == 0:
            ctx.idle.set()
        core = self.core
        core.active = None
        self._active_task = None
        transport = self.transport
        if self.closed or transport is None:
            return
        if not keep_alive or core.must_close or ctx.draining or transport.is_closing():
            transport.close()
            return
        # Whatever the handler left unread of the request body is read and dropped.
        request.body.discard()
        following = core.call_ended(self.timers.time())
        if following is not None:
            self._start(*following)
        if core.paused and core.may_resume():
            self._resume_reading()

    def _body_consumed(self, size: int) -> None:
        if self.core.paused and self.core.may_resume():
            self._resume_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.core.resumed(self.timers.time())
            self.transport.resume_reading()

    # -- timeouts --
    def head_began_at(self, first_byte: float) -> None:
        """The connection's first byte came in at `first_byte` (loop time), before this
        protocol was chosen: the first head's deadline counts from then."""
        deadline = self.core.first_byte_at(first_byte)
        if deadline:
            if self._timer is not None:
                self._timer.cancel()  # it may sleep past this earlier deadline
            self._timer = self.timers.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        kind, wake = self.core.expired(self.timers.time())
        if kind is None:
            self._timer = self.timers.call_at(wake, self._on_timer)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.ctx.timed_out(kind, self.peer)
        self.core.timed_out(kind)
        if kind != HEADER:
            transport.close()

    # -- writing --
    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("client closed the connection")
        if self.write_paused:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
            if self.closed:
                raise ConnectionResetError("client closed the connection")

    def close_if_idle(self) -> None:
        """Draining: close keep-alive connections that have no call in progress."""
        if self.core.idle() and self.transport is not None:
            self.transport.close()
