"""What an HTTP/1.1 writer may put on the wire: the one check both directions share.

A head (request line or status line, then the fields) and a trailer block are built
by joining their parts, then matched once, whole, against the grammar of RFC 9112:
a method and field names that are tokens (RFC 9110 tchar), a request-target in origin
form (or `*`) with no space or control byte, field values of field-vchar, SP and HTAB
(obs-text allowed), and exactly as many lines as the writer wrote: a value holding
CRLF then a well-formed field would match the grammar, so the line count is what tells
an injected field from one written. Whatever an HTTP/2 peer, an app or a filter put in
a field, a head that passes reads back, to any HTTP/1.1 parser, as the same one
message; one that does not is never written. Both checks run over bytes joined anyway
(no pass over the fields); finding which field was bad is left to the refusal.
"""

from __future__ import annotations

import re

from sidecar.proto.messages import HOP_BY_HOP, Headers

# Character classes (regex source) the HTTP/2 engine's checks share (h2fields): RFC 9110
# tchar, its lower-case part (HTTP/2 field names), and RFC 3986's authority characters.
TCHAR_LOWER = rb"!#$%&'*+\-.^_`|~0-9a-z"
TCHAR = TCHAR_LOWER + rb"A-Z"
AUTHORITY_CHARS = rb"A-Za-z0-9\-._~%!$&'()*+,;=:\[\]"
_VALUE = rb"\t\x20-\x7e\x80-\xff"
_TARGET = rb"(?:/[\x21-\x7e\x80-\xff]*|\*)"
_AUTHORITY = rb"[" + AUTHORITY_CHARS + rb"]*"
_FIELDS = rb"(?:[" + TCHAR + rb"]+: [" + _VALUE + rb"]*\r\n)*\r\n"
# `host: ` is the writer's own first field; its value is an authority (RFC 3986 3.2:
# reg-name or IP literal, then a port), which may be empty.
_REQUEST_HEAD = re.compile(
    rb"[" + TCHAR + rb"]+ " + _TARGET + rb" HTTP/1\.1\r\nhost: " + _AUTHORITY + rb"\r\n" + _FIELDS
)
# The fields after a status line the writer formatted itself; and a trailer block
# (after the last chunk's `0\r\n`).
_FIELD_BLOCK = re.compile(_FIELDS)

_TOKEN = re.compile(rb"[" + TCHAR + rb"]+")
_FIELD_VALUE = re.compile(rb"[" + _VALUE + rb"]*")
_TARGET_ONLY = re.compile(_TARGET)
_AUTHORITY_ONLY = re.compile(_AUTHORITY)

# Fields a trailer block may not carry (RFC 9110 6.5.1): framing and routing, which a
# recipient that merged them would act on.
FRAMING_FIELDS = HOP_BY_HOP | {b"content-length", b"trailer", b"te"}


def request_head_ok(joined: bytes, end: int, lines: int) -> bool:
    """True if `joined[:end]` is one well-formed request head of `lines` lines (the blank
    line included; `end`: where the head stops and a body may begin)."""
    # The grammar lets LF in only as a line's end: counting LFs counts lines.
    return (
        _REQUEST_HEAD.fullmatch(joined, 0, end) is not None and joined.count(b"\n", 0, end) == lines
    )


def fields_ok(block: bytes, start: int, lines: int) -> bool:
    """True if `block[start:]` is `lines` lines: fields, then the blank line."""
    return _FIELD_BLOCK.fullmatch(block, start) is not None and block.count(b"\n", start) == lines


def bad_field(fields: Headers) -> bytes | None:
    """The name of the first field that cannot be written as HTTP/1.1, or None."""
    for name, value in fields:
        if _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
            return name
    return None


def bad_request_part(method: bytes, target: bytes, authority: bytes, fields: Headers) -> str:
    """What made a request head fail `request_head_ok`, for the error the caller gets."""
    if _TOKEN.fullmatch(method) is None:
        return f"method {method[:64]!r}"
    if _TARGET_ONLY.fullmatch(target) is None:
        return f"request target {target[:64]!r}"
    if _AUTHORITY_ONLY.fullmatch(authority) is None:
        return f"authority {authority[:64]!r}"
    name = bad_field(fields)
    return f"header {(name or b'?')[:64]!r}"


def last_chunk(trailers: Headers) -> bytes | None:
    """The last chunk of a chunked body with `trailers` (framing fields left out), or
    None if they would not read back as these fields: then the caller drops them."""
    parts = [b"0\r\n"]
    for name, value in trailers:
        if name not in FRAMING_FIELDS:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    block = b"".join(parts)
    return block if fields_ok(block, 3, len(parts) // 4 + 1) else None
