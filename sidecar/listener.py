"""A listener: one TCP port that speaks HTTP/1.1 and cleartext HTTP/2 (prior knowledge),
told apart by the connection's first bytes, and hands every request to one handler.

A new connection is first admitted or refused against the limits its context keeps
(`sidecar.serving.ListenerContext.refusal`); a refused one is closed at once.

With mTLS (`tls.mode` permissive or strict, `sidecar.tls.inbound.InboundTls`) the
listener accepts itself: it peeks at a new connection's first byte without reading it
(0x16, a TLS handshake record, or anything else), hands a TLS one to the loop's TLS
transport (`connect_accepted_socket`, bounded by `tls.handshake_timeout`) and a
plaintext one, in permissive mode, to the plaintext path as before; strict mode refuses
it. The caller's verified SPIFFE ID is recorded before its first request is read. With
`tls.mode: disable` none of this runs: the loop's own server accepts, as it always has.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any, cast

from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.adapters.h2server import H2ServerProtocol
from sidecar.serving import ListenerContext
from sidecar.tls.contexts import PeerRefused, peer_identity, peer_serial
from sidecar.tls.inbound import TLS_HANDSHAKE, InboundTls, peer_key

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


class _TlsDetect(_Detect):
    """_Detect behind a finished TLS handshake: the caller's certificate chain is
    verified (OpenSSL did that); its SPIFFE ID is checked and recorded first."""

    def __init__(self, ctx: ListenerContext, tls: InboundTls, pending: _Accepted) -> None:
        super().__init__(ctx)
        self.tls = tls
        self.pending = pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.ctx.connections.discard(self.pending)  # it counted while handshaking
        peer = self.pending.peer
        try:
            identity = peer_identity(
                transport.get_extra_info("ssl_object"), self.tls.state.trust_domain
            )
        except PeerRefused as exc:
            self.tls.refuse("identity", peer, str(exc))
            cast("asyncio.Transport", transport).abort()
            return
        serial = peer_serial(transport.get_extra_info("ssl_object"))
        self.tls.verified(peer, identity, transport, serial)
        super().connection_made(transport)


def _handshake_refusal(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) for a handshake that failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate", exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", "the client sent no certificate"
        if "PROTOCOL" in reason or "VERSION" in reason:
            return "protocol_version", f"{reason} (tls.min_version)"
        return "handshake", str(exc)
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "handshake_timeout", "the handshake did not finish within tls.handshake_timeout"
    return "handshake", str(exc) or type(exc).__name__


class _Accepted:
    """A connection the TLS listener accepted and has not handed on yet: it waits for the
    first byte (limits.preface_timeout), then for its handshake (tls.handshake_timeout).
    It is in the context's connections meanwhile, so limits and drain see it."""

    def __init__(self, listener: Listener, sock: socket.socket, peer: str) -> None:
        self.listener = listener
        self.sock = sock
        self.peer = peer
        self.loop = listener.loop
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False

    def wait_first_byte(self) -> None:
        self.reading = True
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.timer = self.loop.call_later(self.listener.ctx.limits.preface_timeout, self._timed_out)

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _drop(self) -> None:
        self._stop_reading()
        self.listener.ctx.connections.discard(self)
        self.sock.close()

    def _timed_out(self) -> None:
        self.timer = None
        self.listener.ctx.timed_out("preface", self.peer)
        self._drop()

    def _readable(self) -> None:
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self._stop_reading()
        tls = self.listener.tls
        assert tls is not None
        if not first:
            self._drop()
        elif first[0] == TLS_HANDSHAKE:
            self.task = self.loop.create_task(self._handshake(tls))
        elif tls.mode == "strict":
            tls.refuse("plaintext", self.peer, "plaintext to a port that takes only mTLS")
            self._drop()
        else:
            tls.plaintext_caller(self.peer)
            self.listener.ctx.connections.discard(self)  # _Detect takes its place
            self.task = self.loop.create_task(self._plaintext())

    async def _handshake(self, tls: InboundTls) -> None:
        ctx = self.listener.ctx
        try:
            await self.loop.connect_accepted_socket(
                lambda: _TlsDetect(ctx, tls, self),
                self.sock,
                ssl=tls.state.server,
                ssl_handshake_timeout=tls.handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            reason, detail = _handshake_refusal(exc)
            tls.refuse(reason, self.peer, detail)
        finally:
            ctx.connections.discard(self)

    async def _plaintext(self) -> None:
        ctx = self.listener.ctx
        with contextlib.suppress(OSError):
            await self.loop.connect_accepted_socket(lambda: _Detect(ctx), self.sock)

    def close_if_idle(self) -> None:
        """Draining: not a call on it yet."""
        if self.task is not None:
            self.task.cancel()
        else:
            self._drop()


class Listener:
    def __init__(
        self,
        ctx: ListenerContext,
        host: str,
        port: int,
        reuse_port: bool = False,
        tls: InboundTls | None = None,
    ) -> None:
        self.ctx = ctx
        self.host = host
        self.port = port
        self.reuse_port = reuse_port  # a worker sharing the port with its siblings
        self.tls = tls  # None: plaintext only, accepted by the loop's server
        self.server: asyncio.Server | None = None
        self._sock: socket.socket | None = None  # the TLS listener's own listening socket

    async def start(self) -> int:
        self.loop = asyncio.get_running_loop()
        if self.tls is not None:
            return self._start_tls()
        self.server = await self.bind(self.host, self.port)
        self.port = _bound_port(self.server, self.port)
        return self.port

    async def bind(self, host: str, port: int) -> asyncio.Server:
        """A server on `host:port` for this listener's connections (a reload binds the
        new address first, then `rebind()`s, so a port that cannot be had changes nothing).
        Plaintext listeners only: a TLS listener's address is fixed until a restart."""
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

    def _start_tls(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server(
            (self.host, self.port),
            family=family,
            backlog=1024,
            reuse_port=self.reuse_port,
        )
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.loop.add_reader(sock.fileno(), self._acceptable)
        return self.port

    def _acceptable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):  # a burst at a time, then the loop's other work
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds, say: the listen queue holds them
                self.ctx.log.warning("accept on %s failed: %s", self.ctx.name, exc)
                return
            self._accepted(conn, addr)

    def _accepted(self, conn: socket.socket, addr: Any) -> None:
        ctx = self.ctx
        conn.setblocking(False)
        refusal = ctx.refusal()
        if refusal is not None:
            conn.close()
            ctx.refused(refusal, self.loop.time())
            return
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # the handshake's flights too
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = _Accepted(self, conn, peer_key(addr))
        ctx.connections.add(pending)
        pending.wait_first_byte()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

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
        if self.tls is not None:
            self.stop_accepting()
            for conn in tuple(self.ctx.connections):
                if isinstance(conn, _Accepted):
                    conn.close_if_idle()
                    continue
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.close()
            return
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
