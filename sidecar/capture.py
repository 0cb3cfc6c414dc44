"""Transparent interception: the listener iptables REDIRECTs the app's outbound TCP to.

Each connection's original destination is read back with SO_ORIGINAL_DST, then:
  1. a port in capture.opaque_ports is relayed to it at once, never sniffed;
  2. otherwise the first bytes are awaited for at most capture.detect_timeout
     (server-first protocols such as MySQL or SMTP send nothing until the server speaks):
     HTTP/1.1 or h2c to a known service's address (capture.service_ips, or an endpoint
     discovery knows) goes to the outbound handler like any other mesh call; anything
     else (other protocols, silence, HTTP to an unknown address) is relayed to the
     original destination as plain TCP.
`sidecar.proto.sniff` (classify, Detector) and `CaptureRouter` are Sans-IO;
`_Capture` and `sidecar.adapters.relay.TcpRelay` are the thin asyncio adapters.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.adapters.h2server import H2ServerProtocol
from sidecar.adapters.relay import TcpRelay
from sidecar.clusters import ClusterManager
from sidecar.config import SidecarConfig, parse_ip_port
from sidecar.discovery.base import Endpoint
from sidecar.messages import Request
from sidecar.metrics import Metrics
from sidecar.proto.sniff import Address, Decision, Detector, parse_sockaddr
from sidecar.serving import Handler, ListenerContext, ResponseSink

log = logging.getLogger("sidecar.capture")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, at SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, at SOL_IPV6 (= IPPROTO_IPV6)


# --- Sans-IO core --------------------------------------------------------------------


class CaptureRouter:
    """Which service an original destination stands for, if any.

    capture.service_ips first ("ip:port" before "ip"), then the endpoints discovery
    knows (peers' inbound addresses), indexed at most once per `refresh` seconds.
    """

    def __init__(
        self,
        service_ips: Mapping[str, str],
        endpoints: Callable[[], Iterable[tuple[str, Endpoint]]] = tuple,
        *,
        refresh: float = 1.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.static: dict[tuple[str, int | None], str] = {}
        for key, service in service_ips.items():
            parsed = parse_ip_port(key)
            if parsed is not None:  # the config was validated; skip rather than crash
                self.static[parsed] = service
        self._endpoints = endpoints
        self._refresh = refresh
        self._now = now
        self._index: dict[Address, str] = {}
        self._built_at: float | None = None

    def service_for(self, dst: Address) -> str | None:
        host, port = dst
        service = self.static.get((host, port)) or self.static.get((host, None))
        if service is not None:
            return service
        now = self._now()
        if self._built_at is None or now - self._built_at >= self._refresh:
            self._index = {(e.host, e.port): name for name, e in self._endpoints()}
            self._built_at = now
        return self._index.get(dst)


# --- asyncio adapters ----------------------------------------------------------------


def socket_original_dst(sock: Any) -> Address | None:
    """The destination before iptables REDIRECT rewrote it; None if unknowable."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return parse_sockaddr(raw)
    except (OSError, ValueError):
        return None


class _Capture(asyncio.Protocol):
    """A captured connection until it is decided: meshed, relayed, or refused."""

    def __init__(self, listener: CaptureListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.detector: Detector | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.decided = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        lst = self.listener
        dst = lst.original_dst(transport.get_extra_info("socket"))
        sockname = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        if dst is None or (isinstance(sockname, tuple) and dst == tuple(sockname[:2])):
            # Not redirected (dialled directly): relaying it would loop back to us.
            log.debug("refusing a connection with no original destination (%s)", dst)
            self.transport.abort()
            return
        if isinstance(peer, tuple) and peer[1] in lst.own_ports:
            log.error(
                "captured the sidecar's own connection to %s:%d: run it as the uid the "
                "iptables rules exclude (--proxy-uid); refusing it to break the loop",
                *dst,
            )
            self.transport.abort()
            return
        lst.pending.add(self)
        self.detector = Detector(dst, lst.router, lst.opaque_ports, lst.max_line)
        decision = self.detector.start()
        if decision is not None:
            # Not from inside connection_made: uvloop starts reading once it returns,
            # which would undo the relay's pause_reading() while it dials.
            self.decided = True
            asyncio.get_running_loop().call_soon(self._act, decision)
        else:
            self.timer = asyncio.get_running_loop().call_later(lst.detect_timeout, self._on_timeout)

    def data_received(self, data: bytes) -> None:
        if self.detector is None:
            return
        if self.decided:  # opaque, relayed on the next loop turn: keep it for then
            self.detector.buffer += data
            return
        decision = self.detector.feed(data)
        if decision is not None:
            self.decided = True
            self._act(decision)

    def eof_received(self) -> bool:
        self.eof = True
        if self.detector is not None and not self.decided:
            self.decided = True
            self._act(self.detector.eof())
        return True

    def _on_timeout(self) -> None:
        if self.detector is not None and not self.decided:
            self.decided = True
            self._act(self.detector.timeout())

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()
        self.transport = None

    def _done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        pending = self.listener.pending
        pending.discard(self)
        if not pending:
            self.listener.pending_gone.set()

    def _act(self, decision: Decision) -> None:
        """Hand the connection on; runs once (callers set `decided` first)."""
        self._done()
        if self.transport is None or self.transport.is_closing() or self.detector is None:
            return  # the app went away first
        lst = self.listener
        lst.metrics.capture_connections.labels(decision.kind).inc()
        if decision.kind == "meshed":
            ctx = lst.context_for(decision.service)
            proto = H2ServerProtocol(ctx) if decision.protocol == "h2c" else H1ServerProtocol(ctx)
            self.transport.set_protocol(proto)
            proto.connection_made(self.transport)
            proto.data_received(self.detector.buffer)
        else:
            lst.relay(self.transport, self.detector.dst, self.detector.buffer, self.eof)


class CaptureListener:
    def __init__(
        self,
        cfg: SidecarConfig,
        outbound: Handler,
        clusters: ClusterManager | None,
        metrics: Metrics,
        *,
        original_dst: Callable[[Any], Address | None] = socket_original_dst,
    ) -> None:
        self.reuse_port = False
        self.cfg = cfg
        self.outbound = outbound
        self.metrics = metrics
        self.original_dst = original_dst
        self.host = cfg.listeners.capture.host
        self.port = cfg.listeners.capture.port
        capture = cfg.capture
        self.detect_timeout = capture.detect_timeout
        self.connect_timeout = capture.connect_timeout
        self.opaque_ports = frozenset(capture.opaque_ports)
        self.max_line = cfg.limits.max_request_line
        self.router = CaptureRouter(
            capture.service_ips, (lambda: _known_endpoints(clusters)) if clusters else tuple
        )
        self.server: asyncio.Server | None = None
        self.pending: set[_Capture] = set()
        self.relays: set[TcpRelay] = set()
        self.relays_gone = asyncio.Event()
        self.pending_gone = asyncio.Event()  # set when the last undecided one is decided
        self.draining = False
        # Local ports of our own passthrough sockets: seeing one captured means a loop.
        self.own_ports: set[int] = set()
        self.contexts: dict[str, ListenerContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        bytes_total = metrics.capture_bytes
        self._count_up = bytes_total.labels("upstream").inc
        self._count_down = bytes_total.labels("downstream").inc

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Capture(self),
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,  # workers share the port
            backlog=1024,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def context_for(self, service: str) -> ListenerContext:
        """One listener context per service, whose handler routes every call to it."""
        ctx = self.contexts.get(service)
        if ctx is None:
            authority = service.encode()
            outbound = self.outbound

            async def to_service(request: Request, sink: ResponseSink) -> None:
                # The original destination decided the service; the Host is often an IP.
                request.authority = authority
                await outbound(request, sink)

            ctx = ListenerContext("capture", to_service, self.cfg.http2, self.cfg.limits)
            ctx.draining = self.draining
            self.contexts[service] = ctx
        return ctx

    def relay(self, client: asyncio.Transport, dst: Address, head: bytes, eof: bool) -> None:
        client.pause_reading()  # until the upstream socket is there to take the bytes
        gone = self.relays_gone
        down = TcpRelay(self._count_up, self.relays, gone)
        up = TcpRelay(self._count_down, self.relays, gone)
        TcpRelay.pair(down, up)
        client.set_protocol(down)
        down.connection_made(client)
        task = asyncio.get_running_loop().create_task(self._connect(down, up, dst, head, eof))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(
        self, down: TcpRelay, up: TcpRelay, dst: Address, head: bytes, eof: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        client = down.transport
        assert client is not None
        v6 = ":" in dst[0]
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        port = 0
        try:
            sock.setblocking(False)
            sock.bind(("::" if v6 else "0.0.0.0", 0))  # the local port is known before the SYN
            port = sock.getsockname()[1]
            self.own_ports.add(port)
            async with asyncio.timeout(self.connect_timeout):
                await loop.sock_connect(sock, dst)
            await loop.create_connection(lambda: up, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.own_ports.discard(port)
            log.debug("passthrough to %s:%d failed: %r", dst[0], dst[1], exc)
            client.abort()  # the app sees a reset, as it would without us
            return
        except BaseException:
            sock.close()
            self.own_ports.discard(port)
            raise
        up.on_lost = lambda: self.own_ports.discard(port)
        assert up.transport is not None
        if down.lost:
            up.transport.close()
            return
        if head:
            self._count_up(len(head))
            up.transport.write(head)
        down.connected()
        up.connected()
        if eof:
            down.eof_received()

    def begin_drain(self) -> None:
        """Stop taking connections; meshed ones finish their calls as a listener's do
        (GOAWAY on HTTP/2, idle HTTP/1.1 keep-alives closed), relays run on."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for ctx in self.contexts.values():
            ctx.draining = True
            for conn in tuple(ctx.connections):
                conn.close_if_idle()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every connection still being sniffed is decided, every captured call
        finished and every passthrough relay closed within `timeout` (drain's remaining
        time: a relay is a call we cannot see into, so it gets the same bound, then
        close() cuts it). Rechecked until nothing new started meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not await _until_set(self.pending_gone, self._none_pending, deadline):
                return False
            for ctx in tuple(self.contexts.values()):
                if not await _until_set(ctx.idle, functools.partial(_no_calls, ctx), deadline):
                    return False
            if not await _until_set(self.relays_gone, self._no_relays, deadline):
                return False
            if self._none_pending() and all(map(_no_calls, self.contexts.values())):
                return True

    def _none_pending(self) -> bool:
        return not self.pending

    def _no_relays(self) -> bool:
        return not self.relays

    def has_connections(self) -> bool:
        return any(ctx.connections for ctx in self.contexts.values())

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in tuple(self._tasks):
            task.cancel()
        for pending in tuple(self.pending):
            if pending.transport is not None:
                pending.transport.abort()
        for relay in tuple(self.relays):
            if relay.transport is not None:
                relay.transport.close()
        for ctx in self.contexts.values():
            for conn in tuple(ctx.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.close()
        if self.server is not None:
            await self.server.wait_closed()


def _no_calls(ctx: ListenerContext) -> bool:
    return ctx.in_flight == 0


async def _until_set(event: asyncio.Event, done: Callable[[], bool], deadline: float) -> bool:
    """Wait, up to the loop time `deadline`, for `done()`; `event` is set when it may be."""
    loop = asyncio.get_running_loop()
    while not done():
        event.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(event.wait(), remaining)
        except TimeoutError:
            return done()
    return True


def _known_endpoints(clusters: ClusterManager) -> Iterable[tuple[str, Endpoint]]:
    discovery = clusters.discovery
    for service in discovery.services():
        for endpoint in discovery.endpoints(service) or ():
            yield service, endpoint
