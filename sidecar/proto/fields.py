"""Header fields as both protocols and every layer hold them: a list of (name, value)
byte pairs, names lower-case, and the field sets and helpers the writers share. Pure:
no I/O, no event loop (sidecar.messages builds the call's messages on it).
"""

from __future__ import annotations

from operator import itemgetter

Headers = list[tuple[bytes, bytes]]

# A field's name, for scanning a field list at C speed: `name in map(FIELD_NAME, fields)`
# costs no bytecode per field, where a `for` loop costs several.
FIELD_NAME = itemgetter(0)

# Connection-specific headers (RFC 9110 7.6.1, RFC 9113 8.2.2): never forwarded.
# `te` is handled apart: only `te: trailers` survives (gRPC needs it over HTTP/2).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"http2-settings",
    }
)

# Content-Length values formatted already (content_length); a hot path may look one up
# before it calls the function.
LENGTHS: dict[int, bytes] = {}


def content_length(size: int) -> bytes:
    """`size` as a Content-Length value; sizes up to 64 KiB are formatted once, then kept."""
    value = LENGTHS.get(size)
    if value is None:
        value = str(size).encode()
        if size <= 65536:
            LENGTHS[size] = value
    return value


def field_bytes(fields: Headers) -> int:
    """What `fields` took on the wire, near enough for a limit (name, value, `: `, CRLF)."""
    return sum(len(name) + len(value) + 4 for name, value in fields)


def unsafe_header(headers: Headers) -> bytes | None:
    """The name of the first header whose name or value holds CR, LF or NUL (which
    would split or end the header block on the wire), or None."""
    # Integer membership (13: CR, 10: LF, 0: NUL) means the same as b"\r" in value, and
    # skips CPython's failed attempt to read a bytes operand as an integer first.
    for name, value in headers:
        if 13 in value or 10 in value or 0 in value or 13 in name or 10 in name:
            return name
    return None
