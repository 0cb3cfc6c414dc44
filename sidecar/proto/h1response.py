"""The fields of the HTTP/1.1 responses on one client connection, as httptools (llhttp)
reports them: the head's, then the trailers', a block of their own, each under the
connection's limit. Pure: a base the asyncio connection (upstream/h1conn.py) builds on,
whose `on_header` is the parser's callback as it stands.

- hop-by-hop fields of a head are set aside (the mesh frames its own messages), with
  the names a `Connection:` header lists; a transfer coding other than chunked is
  refused (the connection cannot decode it);
- framing fields in trailers mean nothing there (RFC 9110 6.5.1) and are dropped;
- `max_header_bytes` is counted in the bytes read while a head is incomplete (a sum per
  read, not per field, which the connection keeps in `_head_bytes` and checks inline:
  this runs per read); the head's own fields are counted exactly only when those bytes
  went over it (the read held a body as well). Trailers are counted as they arrive.
"""

from __future__ import annotations

from sidecar.proto.fields import HOP_BY_HOP, Headers, field_bytes
from sidecar.proto.h1head import FRAMING_FIELDS


class Refused(Exception):
    """A response the connection refuses to read on; the message is the reason."""


class ResponseFields:
    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes
        # The fields being parsed: the head's, then (a new list, once the head is
        # taken) the trailers'. Empty between responses.
        self._headers: Headers = []
        self._drop: set[bytes] | None = None  # header names a `Connection:` header listed
        self._in_head = True
        self._head_bytes = 0  # read while the head is incomplete
        self._trailer_bytes = 0  # of the trailer fields counted so far
        self._trailers_counted = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in HOP_BY_HOP:
            if not self._in_head:
                return  # a trailer: framing means nothing there, dropped
            if name == b"transfer-encoding":
                for coding in value.split(b","):
                    coding = coding.strip().lower()
                    if coding != b"chunked":
                        raise Refused(
                            f"transfer coding {coding.decode('latin-1')[:40]!r} is not implemented"
                        )
            elif name == b"connection":
                # Headers it names go too; hop-by-hop ones (keep-alive) are gone already.
                for token in value.split(b","):
                    token = token.strip().lower()
                    if token not in HOP_BY_HOP:
                        if self._drop is None:
                            self._drop = set()
                        self._drop.add(token)
            return
        self._headers.append((name, value))

    def take_trailers(self, trailers: Headers) -> Headers:
        """The response's trailers (`self._headers`, not empty), once it is whole."""
        self._headers = []
        size = self._trailer_bytes + field_bytes(trailers[self._trailers_counted :])
        self._trailer_bytes = self._trailers_counted = 0
        if size > self._max_header_bytes:
            raise Refused(self.over("trailers"))
        return [(n, v) for n, v in trailers if n not in FRAMING_FIELDS]

    def count_trailers(self) -> str | None:
        """After a read that brought trailer fields: why they are refused already, or None."""
        fields = self._headers
        self._trailer_bytes += field_bytes(fields[self._trailers_counted :])
        self._trailers_counted = len(fields)
        return self.over("trailers") if self._trailer_bytes > self._max_header_bytes else None

    def over(self, what: str) -> str:
        return f"response {what} over {self._max_header_bytes} bytes (limits.max_header_bytes)"
