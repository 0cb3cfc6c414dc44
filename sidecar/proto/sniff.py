"""What a captured connection is, from its first bytes and its original destination:
Sans-IO (bytes in, a Decision out), for the transparent capture listener
(sidecar/capture.py) to act on."""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from typing import Literal, Protocol

from sidecar.proto.h2engine import PREFACE as H2_PREFACE

__all__ = ["Address", "Decision", "Detector", "ServiceLookup", "classify", "parse_sockaddr"]

Address = tuple[str, int]
Detected = Literal["http1", "h2c", "other", "more"]
DecisionKind = Literal["meshed", "passthrough", "opaque"]

# HTTP methods are tokens; every real one is upper-case letters.
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} [\x21-\x7e]+ HTTP/1\.[01]\r?\n")
_PARTIAL_LINE = re.compile(rb"[A-Z]{1,20}(?: [\x21-\x7e]*(?: [\x21-\x7e]*\r?)?)?")


class ServiceLookup(Protocol):
    """Which service an original destination stands for (capture.CaptureRouter)."""

    def service_for(self, dst: Address) -> str | None: ...


def parse_sockaddr(raw: bytes) -> Address:
    """A `struct sockaddr_in` or `sockaddr_in6`, as SO_ORIGINAL_DST returns it."""
    family = int.from_bytes(raw[:2], sys.byteorder)  # sa_family is in host order
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"not a sockaddr_in or sockaddr_in6: family {family}, {len(raw)} bytes")


def classify(buffer: bytes, max_line: int = 8192) -> Detected:
    """What the first bytes of a connection are: HTTP/1.x, h2c prior knowledge, other,
    or "more" when they could still be either HTTP."""
    if buffer.startswith(H2_PREFACE):
        return "h2c"
    if not buffer or (len(buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(buffer)):
        return "more"
    end = buffer.find(b"\n", 0, max_line)
    if end >= 0:
        return "http1" if _REQUEST_LINE.fullmatch(buffer, 0, end + 1) else "other"
    if len(buffer) < max_line and _PARTIAL_LINE.fullmatch(buffer):
        return "more"
    return "other"


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    service: str = ""
    protocol: Literal["http1", "h2c", ""] = ""


class Detector:
    """One connection's choice. Feed it what happens; the first Decision is final."""

    def __init__(
        self, dst: Address, router: ServiceLookup, opaque_ports: frozenset[int], max_line: int
    ) -> None:
        self.dst = dst
        self.router = router
        self.opaque = dst[1] in opaque_ports
        self.max_line = max_line
        self.buffer = b""

    def start(self) -> Decision | None:
        return Decision("opaque") if self.opaque else None

    def feed(self, data: bytes) -> Decision | None:
        self.buffer += data
        detected = classify(self.buffer, self.max_line)
        if detected == "more":
            return None
        if detected == "other":
            return Decision("passthrough")
        service = self.router.service_for(self.dst)
        if service is None:
            return Decision("passthrough")  # HTTP to somewhere outside the mesh
        return Decision("meshed", service, detected)

    def timeout(self) -> Decision:
        return Decision("passthrough")

    def eof(self) -> Decision:
        # The app half-closed before a whole request line: relay what it sent, then the FIN.
        return Decision("passthrough")
