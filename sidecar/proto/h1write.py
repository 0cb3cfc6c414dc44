"""HTTP/1.1 message heads as bytes, for both directions: the request head a client
connection writes (with a body that is all here) and the response head a server
connection writes. Pure: the caller holds the body and the transport.

Each head is joined from its parts, then passes h1head's check once, whole, before it is
returned: what would not read back as this one message raises `Unwritable`, naming the
part, and nothing of it is written. The writer frames the message itself, so the fields
that frame one (hop-by-hop ones, content-length) are never copied from the message.
"""

from __future__ import annotations

from sidecar.proto.fields import LENGTHS, Headers, content_length
from sidecar.proto.h1head import (
    BAD,
    HOP,
    KINDS,
    LENGTH,
    bad_request_part,
    kind_of,
    lines_ok,
    request_head_ok,
)

# What is left of the body once the head is written: nothing (the whole body went with
# the head, or there is none), a chunked stream, a stream the close ends (HTTP/1.0), or
# else (>= 0) a count of bytes.
WHOLE, CHUNKED, UNTIL_CLOSE = -2, -1, -3

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

_REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found", 304: b"Not Modified",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    413: b"Content Too Large", 414: b"URI Too Long", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}  # fmt: skip
STATUS_LINES: dict[int, bytes] = {}


class Unwritable(ValueError):
    """A head that would not read back, to an HTTP/1.1 parser, as this one message."""


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))
        STATUS_LINES[status] = line
    return line


def encode_request(
    method: bytes,
    target: bytes,
    authority: bytes,
    fields: Headers,
    data: bytes | None,
    tail: bytes | None,
) -> tuple[bytes, int]:
    """The request's bytes and what is left of its body (WHOLE, CHUNKED or a length).

    `data` is the whole body when it is all here (then `tail`, if not None, is its last
    chunk with the trailers, and the body goes chunked); None when it is streamed, under
    the request's own content-length if it has one, else chunked. Raises Unwritable with
    the part to blame (see h1head.bad_request_part).
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    declared: bytes | None = None
    kinds = KINDS
    for name, value in fields:
        try:
            kind = kinds[name]
        except KeyError:
            kind = kind_of(name)
        if kind:  # the writer frames the request itself; or not a token
            if kind == LENGTH:
                declared = value
            elif kind == BAD:
                raise Unwritable(bad_request_part(method, target, authority, fields))
            continue
        parts += (name, b": ", value, b"\r\n")
    # The request line, host, the fields (four parts each), a framing line, the blank.
    lines = (len(parts) - 6) // 4 + 4
    left = WHOLE
    if data is not None:
        if tail is not None:
            # Trailers need the chunked coding, even for a body that is all here.
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
            data = b"%x\r\n%s\r\n%s" % (len(data), data, tail) if data else tail
        else:
            if data or method in _BODY_METHODS:
                parts += (b"content-length: ", content_length(len(data)), b"\r\n")
            else:
                lines -= 1
            parts.append(b"\r\n")
    elif declared is None:
        left = CHUNKED
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    elif declared.isdigit():
        left = int(declared)
        parts += (b"content-length: ", declared, b"\r\n\r\n")
    else:
        raise Unwritable("header 'content-length'")
    head = b"".join(parts)
    if not request_head_ok(head, lines, method, target, authority):
        raise Unwritable(bad_request_part(method, target, authority, fields))
    return (head + data if data else head), left  # one copy of data, as a join


def encode_response_head(
    status: int,
    fields: Headers,
    data: bytes | None,
    streamed: bool,
    keep_alive: bool,
    http10: bool,
) -> tuple[bytes, int, bool]:
    """The response head, what is left of the body (WHOLE, CHUNKED or the response's own
    content-length) and whether the connection stays open after it.

    `data` is the whole body when it is all here; `streamed` says a body follows the
    head without one (else the response has no body: a HEAD's, a 1xx, 204 or 304).
    Without a length a streamed body goes chunked, or, to an HTTP/1.0 client, ends with
    the connection. Raises Unwritable for a head that would not read back as this one
    response, or a length the body does not have.
    """
    first = STATUS_LINES.get(status) or status_line(status)
    parts = [first]
    declared: bytes | None = None
    kinds = KINDS
    for name, value in fields:
        try:
            kind = kinds[name]
        except KeyError:
            kind = kind_of(name)
        if kind:
            if kind == HOP:
                continue
            if kind == BAD:
                raise Unwritable("a header name that is not a token")
            if declared is not None:
                raise Unwritable("two content-length headers")
            declared = value
        parts += (name, b": ", value, b"\r\n")
    # The status line, one per header (four parts each) and the blank line.
    lines = (len(parts) - 1) // 4 + 2
    left = WHOLE
    if data is None and not streamed:
        pass
    elif declared is None:
        if data is not None:
            parts += (b"content-length: ", content_length(len(data)), b"\r\n")
            lines += 1
        elif http10:
            left = UNTIL_CLOSE  # no chunked coding in HTTP/1.0: the close ends the body
            keep_alive = False
        else:
            left = CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
            lines += 1
    elif data is not None:
        # A length the body does not have would end it early or run into the next.
        if declared != (LENGTHS.get(len(data)) or content_length(len(data))):
            raise Unwritable("a content-length the body does not have")
    elif declared.isdigit():
        left = int(declared)
    else:
        raise Unwritable("an invalid content-length")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Parsers refuse such fields on the way in; an HTTP/2 peer or a filter may not
    # have, and a field holding CR or LF would split the header block on the wire.
    if not lines_ok(head, lines):
        raise Unwritable("a header that HTTP/1.1 cannot carry")
    return head, left, keep_alive
