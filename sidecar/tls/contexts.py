"""The SSLContexts a sidecar handshakes with, built from the current material, and the
checks of a peer's identity once OpenSSL has verified its chain.

`TlsState.update()` swaps in new material: new handshakes use the new contexts, a
connection already up keeps the session it has (in-flight calls are not touched).
OpenSSL checks the chain against the bundle, the validity dates and the key's proof of
possession; the SPIFFE ID in the peer's URI SAN is checked here, as OpenSSL knows
nothing of it (TLS 1.3 clients learn of a refused certificate after their handshake).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

from sidecar.tls import spiffe
from sidecar.tls.material import Material

log = logging.getLogger("sidecar.tls")

ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class PeerRefused(Exception):
    """A peer whose verified certificate does not carry an acceptable identity."""


def _load_chain(ctx: ssl.SSLContext, material: Material) -> None:
    # load_cert_chain reads files only: the checked PEMs go through a private file that
    # lives for the call, so what is loaded is what was checked (not a file changed since).
    fd, path = tempfile.mkstemp(prefix="opus-tls-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(material.key_pem + b"\n" + material.chain_pem)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _base(protocol: int, material: Material, min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=material.bundle_pem.decode("ascii", "replace"))
    _load_chain(ctx, material)
    return ctx


def server_context(material: Material, min_version: str = "1.3") -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, material, min_version)
    ctx.set_alpn_protocols([ALPN_H2, ALPN_HTTP1])
    return ctx


def client_context(material: Material, alpn: str, min_version: str = "1.3") -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, material, min_version)
    # Peers are named by SPIFFE ID (checked after the handshake), not by DNS name.
    ctx.check_hostname = False
    ctx.set_alpn_protocols([alpn])
    return ctx


def peer_identity(ssl_object: Any, trust_domain: str) -> str:
    """The SPIFFE ID of a peer whose chain OpenSSL verified; PeerRefused saying why not."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise PeerRefused("no client certificate")
    uris: list[str] = [v for kind, v in cert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        raise PeerRefused(f"certificate has {len(uris)} URI SANs, a SPIFFE ID needs exactly one")
    try:
        ident = spiffe.parse(uris[0])
    except spiffe.SpiffeError as exc:
        raise PeerRefused(f"certificate's URI SAN is not a SPIFFE ID: {exc}") from None
    if ident.trust_domain != trust_domain:
        raise PeerRefused(f"{uris[0]} is not in trust domain {trust_domain!r}")
    return uris[0]


def peer_serial(ssl_object: Any) -> str:
    """The serial of the peer's certificate as Consul writes serials (colon-separated
    lower-case hex octets), or "" without one."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    digits = str(cert.get("serialNumber", "")) if cert else ""
    if len(digits) % 2:
        digits = "0" + digits
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2)).lower()


class TlsState:
    """The current material and the contexts built from it, shared by the listeners
    (server side) and the upstream pools (client side)."""

    def __init__(self, trust_domain: str, min_version: str, material: Material) -> None:
        self.trust_domain = trust_domain
        self.min_version = min_version
        self.material = material
        self.server: ssl.SSLContext
        self._clients: dict[str, ssl.SSLContext] = {}
        self.generation = 0  # how many times material was put in use
        self.listeners: list[Callable[[Material], None]] = []
        self._build(material)

    def _build(self, material: Material) -> None:
        server = server_context(material, self.min_version)
        clients = {
            alpn: client_context(material, alpn, self.min_version) for alpn in (ALPN_H2, ALPN_HTTP1)
        }
        # Swapped only once all three are built: a failure leaves the old ones in use.
        self.server, self._clients, self.material = server, clients, material
        self.generation += 1

    def client(self, alpn: str) -> ssl.SSLContext:
        return self._clients[alpn]

    def update(self, material: Material) -> None:
        self._build(material)
        log.info(
            "TLS material in use: %s, serial %x, valid until %s",
            material.identity,
            material.leaf.serial_number,
            material.not_after.isoformat(),
        )
        for listener in tuple(self.listeners):
            listener(material)
