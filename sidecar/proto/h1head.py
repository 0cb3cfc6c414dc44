"""What an HTTP/1.1 writer may put on the wire: the one check both directions share.

A head (request line or status line, then the fields) and a trailer block are built
by joining their parts, then checked once, whole, and never written unless they read
back, to any HTTP/1.1 parser, as the same one message (RFC 9112):

- one `bytes.translate` of the joined head deletes every byte a field value may not
  hold (the controls but HTAB, and DEL); exactly the CRLFs of the lines the writer
  wrote must have gone. A CR, LF, NUL or other control byte anywhere (a name, a value,
  the method, the target, the authority) is one more and fails it; so does a value
  holding CRLF then a well-formed field, which makes one line too many. (Deleting the
  33 bytes that may not appear, not keeping the 223 that may, is the cheaper table to
  build: translate builds it on every call.)
- field names (and the method) must be tokens (RFC 9110 tchar): the writers look each
  name up in `KINDS` anyway, to find the fields they frame themselves, and the same
  lookup says whether it is a token. A name not seen before is matched once against the
  grammar and remembered (a bounded table: past it, names are matched every time).
- the request target is origin form (or `*`) with no space or tab, and the authority
  (the writer's own `host:` line) holds RFC 3986 authority characters only.

The grammar is checked where the parts are known, so the whole head is never matched
against a regular expression: this runs on every call. Finding which field was bad is
left to the refusal (`bad_field`, `bad_request_part`).
"""

from __future__ import annotations

import re

from sidecar.proto.fields import HOP_BY_HOP, Headers

# Character classes (regex source) the HTTP/2 engine's checks share (h2fields): RFC 9110
# tchar, its lower-case part (HTTP/2 field names), and RFC 3986's authority characters.
TCHAR_LOWER = rb"!#$%&'*+\-.^_`|~0-9a-z"
TCHAR = TCHAR_LOWER + rb"A-Z"
AUTHORITY_CHARS = rb"A-Za-z0-9\-._~%!$&'()*+,;=:\[\]"

_TOKEN = re.compile(rb"[" + TCHAR + rb"]+")
_AUTHORITY = re.compile(rb"[" + AUTHORITY_CHARS + rb"]*")
_TARGET = re.compile(rb"/[\x21-\x7e\x80-\xff]*|\*")  # for the refusal's reason only

# Every byte a field value may not hold (RFC 9110 5.5 allows field-vchar, SP, HTAB and
# obs-text): the controls but HTAB, and DEL. CR and LF are among them.
CONTROLS = bytes([*range(0, 9), *range(10, 0x20), 0x7F])

# Fields a trailer block may not carry (RFC 9110 6.5.1): framing and routing, which a
# recipient that merged them would act on.
FRAMING_FIELDS = HOP_BY_HOP | {b"content-length", b"trailer", b"te"}

# What a field name is to the writers: PLAIN is written as it is; HOP (hop-by-hop) and
# LENGTH (content-length) frame the message, which the writer does itself; BAD is not a
# token and is never written. A name is classified by its lower-case form.
PLAIN, HOP, LENGTH, BAD = 0, 1, 2, 3
# Names (and authorities) remembered, bounded in count and in size (so the tables hold at
# most ~256 KiB): HTTP/2 peers and apps can send any token; past it, each is matched.
_LEARNED_MAX, _LEARNED_SIZE_MAX = 4096, 64


# A plain dict, looked up with `KINDS[name]` in a `try` (a subscript of an exact dict is
# the fastest lookup there is); a KeyError goes to kind_of, which learns the name.
KINDS: dict[bytes, int] = {name: HOP for name in HOP_BY_HOP}
KINDS[b"content-length"] = LENGTH


def kind_of(name: bytes) -> int:
    """What `name` is (see KINDS), for a name KINDS does not hold yet."""
    if _TOKEN.fullmatch(name) is None:
        return BAD  # refused wherever it appears: never remembered
    kind = KINDS.get(name.lower(), PLAIN)
    if len(KINDS) < _LEARNED_MAX and len(name) <= _LEARNED_SIZE_MAX:
        KINDS[name] = kind
    return kind


_AUTHORITIES: set[bytes] = set()  # authorities checked already (bounded as KINDS)


def lines_ok(head: bytes, lines: int) -> bool:
    """True if `head` holds no byte a field may not, but the CRLFs ending its `lines`
    lines (the blank line included)."""
    return len(head) - len(head.translate(None, CONTROLS)) == 2 * lines


def request_head_ok(
    head: bytes, lines: int, method: bytes, target: bytes, authority: bytes
) -> bool:
    """True if `head`, a request line formatted from `method` and `target`, a `host:`
    line holding `authority` and fields whose names the writer found in KINDS, is
    `lines` lines that read back as that one request."""
    if len(head) - len(head.translate(None, CONTROLS)) != 2 * lines:
        return False
    if KINDS.get(method) is None and kind_of(method) == BAD:
        return False
    # Origin form or `*`, and no SP or HTAB (int needles: `in` with a bytes one is slow).
    if (target[:1] != b"/" and target != b"*") or 32 in target or 9 in target:
        return False
    if authority in _AUTHORITIES:
        return True
    if _AUTHORITY.fullmatch(authority) is None:
        return False
    if len(_AUTHORITIES) < _LEARNED_MAX and len(authority) <= _LEARNED_SIZE_MAX:
        _AUTHORITIES.add(authority)
    return True


def bad_field(fields: Headers) -> bytes | None:
    """The name of the first field that cannot be written as HTTP/1.1, or None."""
    for name, value in fields:
        if kind_of(name) == BAD or value.translate(None, CONTROLS) != value:
            return name
    return None


def bad_request_part(method: bytes, target: bytes, authority: bytes, fields: Headers) -> str:
    """What made a request head fail the checks, for the error the caller gets."""
    if kind_of(method) == BAD or method.translate(None, CONTROLS) != method:
        return f"method {method[:64]!r}"
    if _TARGET.fullmatch(target) is None:
        return f"request target {target[:64]!r}"
    if _AUTHORITY.fullmatch(authority) is None:
        return f"authority {authority[:64]!r}"
    name = bad_field(fields)
    return f"header {(name or b'?')[:64]!r}"


def last_chunk(trailers: Headers) -> bytes | None:
    """The last chunk of a chunked body with `trailers` (framing fields left out), or
    None if they would not read back as these fields: then the caller drops them."""
    parts = [b"0\r\n"]
    for name, value in trailers:
        kind = KINDS.get(name)
        if kind is None:
            kind = kind_of(name)
        if kind == BAD:
            return None
        if kind == PLAIN and name.lower() not in FRAMING_FIELDS:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    block = b"".join(parts)
    return block if lines_ok(block, len(parts) // 4 + 2) else None
