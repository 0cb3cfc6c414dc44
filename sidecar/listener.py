"""A listener: one TCP port that speaks HTTP/1.1 and cleartext HTTP/2 (prior knowledge),
told apart by the connection's first bytes, and hands every request to one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.proto.h1server import H1ServerProtocol, RunningCall
from sidecar.proto.h2server import H2ServerProtocol
from sidecar.proto.messages import Request, Response

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


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


class ListenerContext:
    """What every connection of one listener shares."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        http2: Http2ServerConfig,
        limits: LimitsConfig,
    ) -> None:
        self.name = name
        self.handler = handler
        self.start_now: StartNow | None = getattr(handler, "start_now", None)
        self.http2 = http2
        self.limits = limits
        self.log = logging.getLogger(f"sidecar.listener.{name}")
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.on_accept: Callable[[], None] | None = None  # counts accepted connections


class _Detect(asyncio.Protocol):
    """Reads just enough of a new connection to pick HTTP/2 or HTTP/1.1, then steps aside."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies go out whole in one write; Nagle would hold one back behind the
            # peer's delayed ACK of the previous write.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ctx.on_accept is not None:
            self.ctx.on_accept()

    def data_received(self, data: bytes) -> None:
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
        assert self.transport is not None
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        proto.data_received(buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


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
