"""A listener: one TCP port that speaks HTTP/1.1 and cleartext HTTP/2 (prior knowledge),
told apart by the connection's first bytes, and hands every request to one handler.

It also decides which new connections to take (`Admission`): none beyond a listener's
`limits.max_connections`, and none once the process's open downstream connections would
eat into the file descriptors kept back (`limits.fd_reserve`) for what must keep working
when callers flood it: pooled upstream connections, the admin port, the registry
heartbeat. A refused connection is closed at once, counted and logged (rate-limited).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from sidecar.clock import Timers
from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.proto.h1server import H1ServerProtocol, RunningCall
from sidecar.proto.h2server import H2ServerProtocol
from sidecar.proto.messages import Request, Response

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# At most one log line per listener this often about refused connections.
REFUSAL_LOG_INTERVAL = 10.0


class ResponseSink(Protocol):
    async def send(self, response: Response) -> int:
        """Write the response (head, streamed body, trailers); returns body bytes written."""
        ...


class ImmediateSink(ResponseSink, Protocol):
    """The HTTP/1.1 sink as a call run on callbacks sees it (h1server.py)."""

    def send_now(self, response: Response) -> int | None:
        """Write the response if its body is all here; None, writing nothing, if not."""
        ...

    def done(self) -> None: ...

    def crashed(self) -> None: ...

    def spawn(self, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]: ...


Handler = Callable[[Request, ResponseSink], Awaitable[None]]
# A handler's callback path: takes the call (returning it) or declines (None) having
# changed nothing, and then the handler's coroutine runs in a task.
StartNow = Callable[[Request, ImmediateSink], RunningCall | None]


class ServerConnection(Protocol):
    def close_if_idle(self) -> None: ...


class Admission:
    """The process-wide half of the connection limits, shared by a sidecar's listeners:
    how many downstream connections the fd limit leaves room for."""

    def __init__(self, fd_budget: int | None = None) -> None:
        self.fd_budget = fd_budget  # None: no fd limit to keep under
        self.contexts: list[ListenerContext] = []

    @classmethod
    def from_rlimit(cls, reserve: int) -> Admission:
        """The budget: RLIMIT_NOFILE's soft limit less the fds open now and `reserve`."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls(None)
        try:
            open_now = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_now = 64  # no procfs: a typical start-up figure
        budget = soft - open_now - reserve
        if budget < (soft - open_now) // 2:
            # A reserve that leaves next to nothing would refuse every caller.
            budget = (soft - open_now) // 2
            logging.getLogger("sidecar.listener").warning(
                "RLIMIT_NOFILE %d with %d fds open leaves too little for limits.fd_reserve=%d:"
                " downstream connections are capped at %d",
                soft,
                open_now,
                reserve,
                budget,
            )
        return cls(max(budget, 1))

    def full(self) -> bool:
        budget = self.fd_budget
        return budget is not None and sum(len(c.connections) for c in self.contexts) >= budget


class ListenerContext:
    """What every connection of one listener shares."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        http2: Http2ServerConfig,
        limits: LimitsConfig,
        admission: Admission | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.name = name
        self.timers = timers  # the connections' clock and timers; None: their loop's
        self.handler = handler
        self.start_now: StartNow | None = getattr(handler, "start_now", None)
        self.http2 = http2
        self.limits = limits
        # A connection's one timer never sleeps longer than the shortest timeout, so a
        # deadline set after it was armed is still met without re-arming it.
        self.timer_tick = min(
            limits.preface_timeout,
            limits.header_read_timeout,
            limits.body_read_timeout,
            limits.idle_timeout,
        )
        self.admission = admission if admission is not None else Admission()
        self.admission.contexts.append(self)
        self.log = logging.getLogger(f"sidecar.listener.{name}")
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.on_accept: Callable[[], None] | None = None  # counts accepted connections
        self.on_refuse: Callable[[str], None] | None = None  # counts refusals, by reason
        self.on_timeout: Callable[[str], None] | None = None  # counts closes, by timeout
        self._refused = 0  # since the last log line about it
        self._refusal_logged = -REFUSAL_LOG_INTERVAL

    def refusal(self) -> str | None:
        """Why a new connection cannot be taken now, or None."""
        if len(self.connections) >= self.limits.max_connections:
            return "max_connections"
        if self.admission.full():
            return "fd_reserve"
        return None

    def refused(self, reason: str, now: float) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason)
        self._refused += 1
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            self.log.warning(
                "refused %d new connection(s) at limits.%s (%d open on %s, fd budget %s)",
                self._refused,
                reason,
                len(self.connections),
                self.name,
                self.admission.fd_budget,
            )
            self._refused = 0
            self._refusal_logged = now

    def timed_out(self, timeout: str, peer: str) -> None:
        """A connection is closed by one of its timeouts (limits.<timeout>_timeout)."""
        if self.on_timeout is not None:
            self.on_timeout(timeout)
        self.log.debug("closing connection from %s: %s_timeout", peer, timeout)


class _Detect(asyncio.Protocol):
    """Reads just enough of a new connection to pick HTTP/2 or HTTP/1.1, then steps aside.

    It is the connection's first protocol: it admits or refuses it, and gives it
    `limits.preface_timeout` to say which protocol it speaks."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.deadline = 0.0  # loop time by which the protocol must be known
        self.first_byte = 0.0  # loop time the first byte arrived
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        ctx = self.ctx
        now = self.loop.time()
        refusal = ctx.refusal()
        if refusal is not None:
            self.transport = None
            transport.abort()
            ctx.refused(refusal, now)
            return
        ctx.connections.add(self)
        self.deadline = now + ctx.limits.preface_timeout
        self._timer = self.loop.call_at(self.deadline, self._timed_out)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies go out whole in one write; Nagle would hold one back behind the
            # peer's delayed ACK of the previous write.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ctx.on_accept is not None:
            self.ctx.on_accept()

    def data_received(self, data: bytes) -> None:
        if not self.buffer:
            self.first_byte = self.loop.time()
        self.buffer += data
        buffer = self.buffer
        if len(buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(buffer):
            return  # could still be HTTP/2: wait for the rest of the preface
        proto: H1ServerProtocol | H2ServerProtocol
        # "PRI " is the preface's (RFC 9113 3.4: no HTTP/1.1 method): a preface that
        # diverges after it is an invalid one, answered with GOAWAY (3.5), not a 400.
        if buffer.startswith(b"PRI "):
            proto = H2ServerProtocol(self.ctx)
        else:
            proto = H1ServerProtocol(self.ctx)
        transport = self.transport
        if transport is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.connections.discard(self)  # the protocol below takes its place
        if isinstance(proto, H2ServerProtocol):
            proto.preface_deadline = self.deadline  # until the client's SETTINGS are in
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(buffer)
        if isinstance(proto, H1ServerProtocol):
            proto.head_began_at(self.first_byte)

    def _timed_out(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None:
            peer = transport.get_extra_info("peername")
            self.ctx.timed_out("preface", f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "")
            transport.close()

    def close_if_idle(self) -> None:
        """Draining: a connection that has not sent a request yet is closed."""
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.ctx.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Listener:
    def __init__(
        self, ctx: ListenerContext, host: str, port: int, reuse_port: bool = False
    ) -> None:
        self.ctx = ctx
        self.host = host
        self.port = port
        self.reuse_port = reuse_port  # a worker sharing the port with its siblings
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        self.server = await loop.create_server(
            lambda: _Detect(ctx),
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        for sock in self.server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.port = sock.getsockname()[1]
                break
        return self.port

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def begin_drain(self) -> None:
        """Stop taking calls: GOAWAY on HTTP/2, close idle HTTP/1.1 keep-alives."""
        self.ctx.draining = True
        self.stop_accepting()
        for conn in tuple(self.ctx.connections):
            conn.close_if_idle()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every in-flight call finished within `timeout`."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while ctx.in_flight > 0:
            ctx.idle.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(ctx.idle.wait(), remaining)
            except TimeoutError:
                return ctx.in_flight == 0
        return True

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in tuple(self.ctx.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.close()
            await self.server.wait_closed()
