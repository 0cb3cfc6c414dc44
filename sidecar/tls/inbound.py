"""What an inbound listener in `permissive` or `strict` mode keeps besides its
ListenerContext: the TLS state to handshake with, the verified identity of each
connection's caller, and the counts and log lines of what it refused.

A caller's identity is keyed by its address as the protocol adapters name it
(`Request.peer`, "ip:port"), so the handler finds it for each call without the adapters
carrying it: every accepted connection sets or clears its address's entry before its
first byte is served, so an entry is never a former connection's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sidecar.tls.contexts import TlsState

log = logging.getLogger("sidecar.tls")

TLS_HANDSHAKE = 0x16  # a TLS record's content type: the first byte of a ClientHello
LOG_BURST = 20  # refusal lines per LOG_WINDOW before they are summarized
LOG_WINDOW = 10.0


def peer_key(peername: Any) -> str:
    """A connection's address as the adapters write it (Request.peer)."""
    return f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else ""


class InboundTls:
    def __init__(
        self, mode: str, state: TlsState, handshake_timeout: float, listener: str = "inbound"
    ) -> None:
        self.mode = mode  # "permissive" or "strict"
        self.state = state
        self.handshake_timeout = handshake_timeout
        self.listener = listener
        # Request.peer -> (the caller's SPIFFE ID, its transport, to prune closed ones).
        self.peers: dict[str, tuple[str, Any]] = {}
        # Request.peer -> the serial of the caller's certificate (Consul's authorize asks).
        self.serials: dict[str, str] = {}
        self.handshakes = 0
        self.plaintext = 0
        self.refused: dict[str, int] = {}
        self.on_refuse: Callable[[str], None] | None = None  # a metric, by reason
        self._window_start = 0.0
        self._window_lines = 0
        self._suppressed = 0

    @property
    def by(self) -> str:
        """This sidecar's identity, XFCC's `By`."""
        return self.state.material.identity

    def identity(self, peer: str) -> str:
        entry = self.peers.get(peer)
        return entry[0] if entry is not None else ""

    def serial(self, peer: str) -> str:
        """The serial of the certificate the caller at `peer` presented ("" for none)."""
        return self.serials.get(peer, "")

    def verified(self, peer: str, identity: str, transport: Any, serial: str = "") -> None:
        self.handshakes += 1
        if len(self.peers) >= 1024 and len(self.peers) % 1024 == 0:
            self._prune()
        self.peers[peer] = (identity, transport)
        self.serials[peer] = serial

    def plaintext_caller(self, peer: str) -> None:
        self.plaintext += 1
        self.peers.pop(peer, None)
        self.serials.pop(peer, None)

    def _prune(self) -> None:
        for key, (_, transport) in tuple(self.peers.items()):
            if transport.is_closing():
                del self.peers[key]
                self.serials.pop(key, None)

    def refuse(self, reason: str, peer: str, detail: str) -> None:
        """Count a refused connection and log it (at most LOG_BURST lines per window)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.on_refuse is not None:
            self.on_refuse(reason)
        now = time.monotonic()
        if now - self._window_start >= LOG_WINDOW:
            if self._suppressed:
                log.warning(
                    "%s: %d more refused TLS connection(s) not logged",
                    self.listener,
                    self._suppressed,
                )
            self._window_start, self._window_lines, self._suppressed = now, 0, 0
        if self._window_lines >= LOG_BURST:
            self._suppressed += 1
            return
        self._window_lines += 1
        log.warning(
            "%s: refused connection from %s (tls.mode %s): %s: %s",
            self.listener,
            peer or "?",
            self.mode,
            reason,
            detail,
        )
