"""The client side of mTLS, for the pools that dial peer sidecars: the context to
handshake with (ALPN h2 or http/1.1, the sidecar's certificate, the bundle), and the
secure-naming check of the peer once its chain is verified: it must present the SPIFFE
ID the target service is known by (`MeshTls.expected_identity`), not just any valid one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from sidecar.discovery.base import Endpoint, registered_identity
from sidecar.errors import MeshError, UpstreamIdentityError
from sidecar.tls.contexts import ALPN_HTTP1, PeerRefused, TlsState, peer_identity

log = logging.getLogger("sidecar.tls")

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class UpstreamTls:
    def __init__(
        self,
        state: TlsState,
        expected: Callable[[str, str], str],
        handshake_timeout: float,
    ) -> None:
        self.state = state
        self.expected = expected  # (service, the registry's identity) -> the SPIFFE ID
        self.handshake_timeout = handshake_timeout
        self.on_refuse: Callable[[str], None] | None = None  # a metric, by reason

    def context(self, alpn: str) -> ssl.SSLContext:
        return self.state.client(alpn)

    def verify(
        self,
        transport: Any,
        service: str,
        endpoint: Endpoint,
        alpn: str,
        close: Callable[[], object],
    ) -> str:
        """The peer's SPIFFE ID if it is `service`'s; else close and UpstreamIdentityError."""
        expected = self.expected(service, registered_identity(endpoint))
        ssl_object: Any = transport.get_extra_info("ssl_object") if transport else None
        try:
            got = peer_identity(ssl_object, self.state.trust_domain)
        except PeerRefused as exc:
            return self._refuse(close, "identity", service, endpoint, str(exc))
        if got != expected:
            return self._refuse(
                close,
                "identity",
                service,
                endpoint,
                f"it presented {got}, not {expected} (secure naming)",
            )
        selected = ssl_object.selected_alpn_protocol()  # peer_identity: not None
        if selected != alpn:
            return self._refuse(
                close, "alpn", service, endpoint, f"ALPN {selected!r}, not {alpn!r}"
            )
        return got

    def _refuse(
        self, close: Callable[[], object], reason: str, service: str, endpoint: Endpoint, why: str
    ) -> str:
        close()
        if self.on_refuse is not None:
            self.on_refuse(reason)
        message = f"mTLS: refused {service} at {endpoint.address}: {why}"
        log.warning("%s", message)
        raise UpstreamIdentityError(message, service=service)

    def handshake_failed(self, service: str, endpoint: Endpoint, exc: BaseException) -> None:
        """Count and log a failed handshake (the pool reports it as a connect error)."""
        if self.on_refuse is not None:
            self.on_refuse(
                "certificate" if isinstance(exc, ssl.SSLCertVerificationError) else "handshake"
            )
        log.warning("mTLS: handshake with %s at %s failed: %s", service, endpoint.address, exc)

    def h1_connect(
        self, service: str, endpoint_at: Callable[[str, int], Endpoint]
    ) -> Callable[[Callable[[], _P], str, int], Coroutine[Any, Any, tuple[Any, _P]]]:
        """An H1Pool `connect` that speaks TLS (ALPN http/1.1) and checks the peer;
        `endpoint_at(host, port)` is the cluster's endpoint there (with its metadata)."""

        async def connect(factory: Callable[[], _P], host: str, port: int) -> tuple[Any, _P]:
            loop = asyncio.get_running_loop()
            endpoint = endpoint_at(host, port)
            try:
                transport, proto = await loop.create_connection(
                    factory,
                    host,
                    port,
                    ssl=self.context(ALPN_HTTP1),
                    ssl_handshake_timeout=self.handshake_timeout,
                )
            except ssl.SSLError as exc:
                self.handshake_failed(service, endpoint, exc)
                raise
            self.verify(transport, service, endpoint, ALPN_HTTP1, transport.abort)
            return transport, proto

        return connect

    def health_probe(
        self, service: str, path: str, timeout: float
    ) -> Callable[[Endpoint], Awaitable[bool]]:
        """Active health checks over mTLS: GET `path` on a fresh connection to a peer that
        proves to be `service`; True on a 2xx within `timeout` (health.http_probe's rule)."""

        async def probe(endpoint: Endpoint) -> bool:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(
                        endpoint.host, endpoint.port, ssl=self.context(ALPN_HTTP1)
                    )
                    self.verify(writer.transport, service, endpoint, ALPN_HTTP1, writer.close)
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: {endpoint.address}\r\n"
                        "User-Agent: opus-health\r\nConnection: close\r\n\r\n".encode("latin-1")
                    )
                    status_line = await reader.readline()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, MeshError):
                return False
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            parts = status_line.split(None, 2)
            return len(parts) >= 2 and parts[1][:1] == b"2" and len(parts[1]) == 3

        return probe
