"""A listener: one TCP port that speaks HTTP/1.1 and cleartext HTTP/2 (prior knowledge),
told apart by the connection's first bytes, and hands every request to one handler.

A new connection is first admitted or refused against the limits its context keeps
(`sidecar.serving.ListenerContext.refusal`); a refused one is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import cast

from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.adapters.h2server import H2ServerProtocol
from sidecar.serving import ListenerContext

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


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
        self.server = await self.bind(self.host, self.port)
        self.port = _bound_port(self.server, self.port)
        return self.port

    async def bind(self, host: str, port: int) -> asyncio.Server:
        """A server on `host:port` for this listener's connections (a reload binds the
        new address first, then `rebind()`s, so a port that cannot be had changes nothing)."""
        ctx = self.ctx
        return await asyncio.get_running_loop().create_server(
            lambda: _Detect(ctx),
            host,
            port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )

    def rebind(self, server: asyncio.Server, host: str, port: int) -> int:
        """Accept on `server` (from `bind()`) from now on; the old address stops accepting,
        and its open connections go on (they share the context) until they end."""
        old, self.server = self.server, server
        if old is not None:
            old.close()
        self.host, self.port = host, _bound_port(server, port)
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


def _bound_port(server: asyncio.Server, port: int) -> int:
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            bound: int = sock.getsockname()[1]
            return bound
    return port
