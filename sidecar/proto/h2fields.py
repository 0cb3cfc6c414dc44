"""What makes an HTTP/2 message malformed (RFC 9113 8.2, 8.3) and what jh2's HPACK
decoder lets through that RFC 7541 forbids (4.2, 5.2): the checks the engine
(sidecar/proto/h2engine.py) runs in the one pass it makes over each header list.

Every field is checked once, with two C calls for its value (`translate` and `strip`)
and a dict lookup for its name (a regex only for a name outside the common set).
Names are held to RFC 9110's token (lowercase), values to RFC 9110's field-value (no
control character but HTAB): stricter than RFC 9113's minimum, as nghttp2 is, since
what is accepted here is written to HTTP/1.1 next, whose parsers split on less.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import islice

from hpack.huffman_constants import REQUEST_CODES_LENGTH

from sidecar.proto.h1head import AUTHORITY_CHARS, TCHAR, TCHAR_LOWER

__all__ = [
    "HPACK_PASSED",
    "Malformed",
    "check_hpack_block",
    "check_trailers",
    "request_length",
    "response_length",
]


class Malformed(Exception):
    """The header list breaks RFC 9113 8.2/8.3; the message names the field."""


class HpackViolation(Exception):
    """The header block breaks RFC 7541 where the compiled decoder does not check."""


# A byte of a field value that is a control character other than HTAB (RFC 9110 5.5)
# is mapped to another byte by translate(), so a value holding one comes back as a
# different object (a table with no deletions: no per-call setup in CPython).
_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"
_FLAG_CONTROL = bytes((0 if c == 0x7F else 0x7F) if c in _CONTROL else c for c in range(256))
_TOKEN_NAME = re.compile(rb"[" + TCHAR_LOWER + rb"]+").fullmatch
_TOKEN = re.compile(rb"[" + TCHAR + rb"]+").fullmatch
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*").fullmatch
# RFC 3986 host and port, no userinfo (RFC 9113 8.3.1).
_AUTHORITY = re.compile(rb"[" + AUTHORITY_CHARS + rb"]+").fullmatch

# What a regular field name needs handled beyond its syntax.
_PLAIN, _LENGTH, _TE, _CONNECTION, _HOST = 0, 1, 2, 3, 4
# Common names known to be valid tokens (no regex for them), and the special ones.
_NAMES: dict[bytes, int] = dict.fromkeys(
    (
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"authorization",
        b"cache-control",
        b"content-encoding",
        b"content-type",
        b"cookie",
        b"date",
        b"etag",
        b"grpc-encoding",
        b"grpc-accept-encoding",
        b"grpc-message",
        b"grpc-status",
        b"grpc-timeout",
        b"last-modified",
        b"location",
        b"server",
        b"set-cookie",
        b"traceparent",
        b"user-agent",
        b"vary",
        b"x-forwarded-for",
        b"x-request-id",
    ),
    _PLAIN,
)
_NAMES.update({b"content-length": _LENGTH, b"te": _TE, b"host": _HOST})
# RFC 9113 8.2.2: connection-specific fields make a message malformed.
_NAMES.update(
    dict.fromkeys(
        (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"),
        _CONNECTION,
    )
)
# Pseudo-headers of a request: a bit each (16 and up, apart from the kinds above), in
# the same table, so a field costs one lookup whatever it is.
_METHOD, _SCHEME_BIT, _PATH, _AUTHORITY_BIT = 16, 32, 64, 128
_PSEUDO = _METHOD
_ALL_PSEUDO = _METHOD | _SCHEME_BIT | _PATH | _AUTHORITY_BIT
_REQUEST_NAMES = dict(_NAMES)
_REQUEST_NAMES.update(
    {b":method": _METHOD, b":scheme": _SCHEME_BIT, b":path": _PATH, b":authority": _AUTHORITY_BIT}
)
_COMMON_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"})
# Names learned to be plain tokens (beyond the common set), bounded in count and size:
# past it, a new name is matched every time.
_LEARNED_MAX, _LEARNED_NAME_MAX = 4096, 64


def _kind(name: bytes) -> int:
    """What a field name not in the tables needs: Malformed if it is not a lowercase
    token (a pseudo-header not known for the message included); a token is learned."""
    if _TOKEN_NAME(name) is None:
        raise Malformed(f"invalid field name {name!r}")
    if len(_NAMES) < _LEARNED_MAX and len(name) <= _LEARNED_NAME_MAX:
        _NAMES[name] = _REQUEST_NAMES[name] = _PLAIN
    return _PLAIN


def _bad_value(name: bytes) -> Malformed:
    return Malformed(
        f"field {name!r} has a value with a control character or surrounding whitespace"
    )


def _content_length(value: bytes, length: int) -> int:
    if not value.isdigit() or (length >= 0 and int(value) != length):
        raise Malformed(f"content-length {value!r} is not digits or disagrees with another")
    return int(value)


def _special(kind: int, name: bytes, value: bytes, length: int) -> int:
    """Check a field of a special `kind` (its name and value are valid); returns the
    content-length so far (-1: none)."""
    if kind == _LENGTH:
        return _content_length(value, length)
    if kind == _CONNECTION:
        raise Malformed(f"connection-specific field {name!r}")
    if kind == _TE and value.lower() != b"trailers":
        raise Malformed(f"te: {value!r} (only 'trailers' is allowed)")
    return length


def request_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The request's content-length (-1: none); Malformed (RFC 9113 8.2, 8.3.1) when a
    name or value is invalid, a pseudo-header is unknown, repeated or after a regular
    field, :method, :scheme or :path is missing or invalid (CONNECT aside, which the
    sidecar does not serve), there is no authority, or a connection-specific field or a
    `te` other than "trailers" is present."""
    seen = 0
    regular = False
    length = -1
    method = path = scheme = b""
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if value.translate(_FLAG_CONTROL).strip() is not value:
            raise _bad_value(name)
        try:
            kind = _REQUEST_NAMES[name]
        except KeyError:
            kind = _kind(name)
        if kind < _PSEUDO:
            regular = True
            if kind:
                if kind == _HOST:
                    if host is not None:
                        raise Malformed("a second host field")
                    host = value
                else:
                    length = _special(kind, name, value, length)
            continue
        if regular or seen & kind:
            raise Malformed(f"pseudo-header {name!r} repeated or after a regular field")
        seen |= kind
        if kind == _METHOD:
            method = value
        elif kind == _PATH:
            path = value
        elif kind == _SCHEME_BIT:
            scheme = value
        else:
            authority = value
    if seen | _AUTHORITY_BIT != _ALL_PSEUDO:
        raise Malformed("one of :method, :scheme, :path is missing")
    if method not in _COMMON_METHODS and _TOKEN(method) is None:
        raise Malformed(f":method {method!r} is not a token")
    if scheme not in (b"http", b"https") and _SCHEME(scheme) is None:
        raise Malformed(f":scheme {scheme!r} is not a scheme")
    if (
        not path.isascii() or 32 in path or 9 in path
    ):  # SP, HTAB (int needles: no exception inside `in`)
        raise Malformed(f":path {path!r} has a space or a byte outside ASCII")
    if path[:1] != b"/" and (path != b"*" or method != b"OPTIONS"):
        raise Malformed(f":path {path!r} is empty or neither origin-form nor OPTIONS '*'")
    if authority is None:
        authority = host
        if authority is None:
            raise Malformed("neither :authority nor host")
    elif host is not None and host != authority:
        raise Malformed(f"host {host!r} differs from :authority {authority!r}")
    if (
        not authority.replace(b".", b"").replace(b":", b"").isalnum()
        and _AUTHORITY(authority) is None
    ):
        raise Malformed(f"authority {authority!r} is not host[:port]")
    return length


def response_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The response's content-length (-1: none); Malformed when :status is not first,
    not three digits, or not alone among pseudo-headers, or a field is invalid."""
    if not headers or headers[0][0] != b":status":
        raise Malformed(":status missing or not first")
    status = headers[0][1]
    if len(status) != 3 or not status.isdigit():
        raise Malformed(f":status {status!r} is not three digits")
    length = -1
    for name, value in islice(headers, 1, None):
        if value.translate(_FLAG_CONTROL).strip() is not value:
            raise _bad_value(name)
        try:
            kind = _NAMES[name]
        except KeyError:
            kind = _kind(name)
        if kind:
            length = _special(kind, name, value, length)
    return length


def check_trailers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Malformed when a trailer field is invalid, a pseudo-header, connection-specific,
    a `te` other than "trailers", or a content-length (framing is settled by then)."""
    for name, value in headers:
        if value.translate(_FLAG_CONTROL).strip() is not value:
            raise _bad_value(name)
        try:
            kind = _NAMES[name]
        except KeyError:
            kind = _kind(name)
        if kind == _LENGTH:
            raise Malformed("content-length in trailers")
        if kind:
            _special(kind, name, value, -1)


# -- HPACK (RFC 7541) ---------------------------------------------------------------

# Each byte's Huffman code length in bits (RFC 7541 Appendix B), for translate().
_HUFFMAN_BITS = bytes(REQUEST_CODES_LENGTH[:256])


# For a Huffman string of `bits` bits, the mask of its padding bits in the last byte
# (indexed by bits % 8): the padding must be all ones, the EOS code's high bits.
_PAD_MASK = tuple((1 << (-bits % 8)) - 1 for bits in range(8))


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) at `pos` with a `prefix` mask: (value, next pos)."""
    value = block[pos] & prefix
    pos += 1
    if value == prefix:
        shift = 0
        while True:
            octet = block[pos]
            pos += 1
            value += (octet & 0x7F) << shift
            shift += 7
            if not octet & 0x80:
                break
    return value, pos


def _string(block: bytes, pos: int, decoded: bytes) -> int:
    """Skip a string literal (RFC 7541 5.2) whose decoding is `decoded`; a Huffman one
    must end in at most 7 bits of padding, all ones (the EOS code's most significant
    bits). Returns the position after it."""
    octet = block[pos]
    length = octet & 0x7F
    if length == 0x7F:
        length, pos = _integer(block, pos, 0x7F)
    else:
        pos += 1
    end = pos + length
    if octet & 0x80:
        bits = sum(decoded.translate(_HUFFMAN_BITS))
        mask = _PAD_MASK[bits & 7]
        if (bits + 7) >> 3 != length or (length and block[end - 1] & mask != mask):
            raise HpackViolation("Huffman string padding is not 0-7 one bits")
    return end


# Blocks that passed the walk: its verdict depends on the block's bytes alone (the
# strings it checks are literals in the block), so a block seen again (an encoder that
# does not index, nginx's for one, repeats its response heads byte for byte) is not
# walked again. Bounded: small blocks only, cleared when full (an attacker who fills it
# gets the walk, the cost without it).
HPACK_PASSED: dict[bytes, None] = {}
HPACK_PASSED_MAX, HPACK_PASSED_MAX_BLOCK = 1024, 512


def check_hpack_block(block: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Walk a block the decoder accepted, as `headers` (its decoding, in order):
    HpackViolation if a dynamic table size update follows a field (RFC 7541 4.2) or a
    Huffman string is padded with anything but 0-7 one bits (5.2). The caller (the
    engine's decoder, h2headers) skips what needs no walk: a block of one byte per
    field (all indexed, the common case of a repeated head) and one in HPACK_PASSED.
    The common one-byte integers are read inline."""
    end = len(block)
    pos = field = 0
    try:
        while pos < end:
            octet = block[pos]
            if octet & 0x80:  # indexed field (6.1)
                pos = pos + 1 if octet != 0xFF else _integer(block, pos, 0x7F)[1]
                field += 1
            elif octet & 0xE0 == 0x20:  # dynamic table size update (6.3)
                if field:
                    raise HpackViolation("dynamic table size update after a field")
                pos = _integer(block, pos, 0x1F)[1]
            else:  # literal field, with or without indexing (6.2)
                prefix = 0x3F if octet & 0x40 else 0x0F
                index = octet & prefix
                if index == prefix:
                    pos = _integer(block, pos, prefix)[1]
                else:
                    pos += 1
                name, value = headers[field]
                if not index:
                    pos = _string(block, pos, name)
                pos = _string(block, pos, value)
                field += 1
    except IndexError:  # the decoder and this walk disagree: refuse, never guess
        raise HpackViolation("header block structure not understood") from None
    if end <= HPACK_PASSED_MAX_BLOCK:
        if len(HPACK_PASSED) >= HPACK_PASSED_MAX:
            HPACK_PASSED.clear()
        HPACK_PASSED[block] = None
