"""The fields of the HTTP/1.1 requests on one server connection, as httptools (llhttp)
reports them, and what the connection is reading (`State`). Pure: the base of the
connection's core (proto/h1server.py), whose `on_url` and `on_header` are the parser's
callbacks as they stand.

- the request target is bounded (limits.max_request_line: 414);
- hop-by-hop fields are set aside, with the names a `Connection:` header lists; one
  Host (a second is a 400); a transfer coding must end in chunked, once (others: 501);
  `te` survives only as `te: trailers`;
- trailers are a block of their own, under limits.max_header_bytes (431), and may not
  carry framing or routing fields (400, RFC 9110 6.5.1);
- `max_header_bytes` of a head is counted in the bytes read while it is incomplete (a
  sum per read, not per field); the head is counted exactly only when those bytes went
  over it (they may hold the request line, or a body after the head).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

import httptools

from sidecar.proto.fields import HOP_BY_HOP, Headers


class State(IntEnum):
    """What a connection is reading (proto/h1server's docstring draws the table)."""

    IDLE = 0
    HEAD = 1
    BODY = 2
    CLOSED = 3


IDLE, HEAD, BODY, CLOSED = State.IDLE, State.HEAD, State.BODY, State.CLOSED


class Refusal(Exception):
    """A request the connection refuses: its status and the reason the client is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Limits(Protocol):
    """The limits the core keeps (sidecar.config's LimitsConfig has them)."""

    @property
    def max_request_line(self) -> int: ...
    @property
    def max_header_bytes(self) -> int: ...
    @property
    def header_read_timeout(self) -> float: ...
    @property
    def body_read_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...


class RequestFields:
    """The request fields being parsed and the reading state (the core's base)."""

    def __init__(self, limits: Limits) -> None:
        self.state: State = IDLE
        self._max_request_line = limits.max_request_line
        self._max_header_bytes = limits.max_header_bytes
        # The head being parsed: its target, its fields (hop-by-hop ones set aside), then
        # (a new list, once the head is a request) the trailers', a block of their own.
        self._url = b""
        self._headers: Headers = []
        self._host: bytes | None = None
        self._connection_tokens: list[bytes] | None = None
        # limits.max_header_bytes: the bytes read while a head is incomplete are counted
        # (a sum per read, not per field); a head is counted exactly, field by field, only
        # when those bytes went over the limit (they may hold the request line, or a body
        # after the head). Past the limit by more than a request line could explain, a head
        # still arriving is refused there and then. Trailers are counted as they arrive.
        self._head_read = 0
        self._head_read_max = limits.max_header_bytes + limits.max_request_line + 4096
        self._hop_bytes = 0  # the head's hop-by-hop fields, which _headers does not hold
        self._trailer_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_request_line:
            raise Refusal(414, f"request target over {self._max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in HOP_BY_HOP:
            if self.state is BODY:  # past the head: a trailer
                refuse_trailer(name)
            self._hop_bytes += len(name) + len(value) + 4
            if name == b"host":
                if self._host is not None:
                    raise Refusal(400, "a request may have one Host header, not two")
                self._host = value
            elif name == b"transfer-encoding":
                _check_transfer_coding(value)
            elif name == b"connection":
                # The headers the last Connection header names go too (hop-by-hop ones,
                # such as keep-alive, are gone already).
                tokens = [t.strip().lower() for t in value.split(b",")]
                self._connection_tokens = [t for t in tokens if t not in HOP_BY_HOP]
            return
        if name == b"te":
            if self.state is BODY:
                refuse_trailer(name)
            if value.strip().lower() != b"trailers":
                self._hop_bytes += len(name) + len(value) + 4  # dropped, as hop-by-hop ones
                return
        self._headers.append((name, value))
        if self.state is BODY:  # a trailer
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self._max_header_bytes:
                raise Refusal(431, f"request trailers over {self._max_header_bytes} bytes")

    def _absolute(self, url: bytes) -> tuple[bytes, bytes]:
        """The path and authority of a target in absolute form (a proxy's)."""
        authority = self._host or b""
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError as exc:
            raise Refusal(400, f"invalid request target: {exc}") from None
        if parsed.host:
            host = b"[%s]" % parsed.host if b":" in parsed.host else parsed.host
            authority = host if parsed.port is None else b"%s:%d" % (host, parsed.port)
        path = parsed.path or b"/"
        if parsed.query:
            path += b"?" + parsed.query
        return path, authority


def refuse_trailer(name: bytes) -> None:
    # A recipient that merged it would frame or route by it (RFC 9110 6.5.1).
    raise Refusal(400, f"a request trailer may not be {name.decode('latin-1')!r}")


def _check_transfer_coding(value: bytes) -> None:
    """Only `chunked`, last and once, frames a request body (RFC 9112 6.1, 6.3)."""
    codings = [coding.split(b";", 1)[0].strip().lower() for coding in value.split(b",")]
    if codings[-1] != b"chunked":
        raise Refusal(400, "a request's transfer-encoding must end in chunked")
    for coding in codings[:-1]:
        if coding == b"chunked":
            raise Refusal(400, "a request's transfer-encoding may name chunked once")
        raise Refusal(501, f"transfer coding {coding.decode('latin-1')[:40]!r} is not implemented")
