"""Property tests for the HTTP/1.1 parsing path: H1ServerProtocol over the in-memory
transport (tests/unit/memtransport.py), fed random and mutated requests in random splits.

Properties: feeding never raises; the connection never hangs (within a bounded number
of loop turns every call started is answered or the connection is closed); a request
the handler sees has no CR, LF or NUL in its target or headers; a head with both
Content-Length and Transfer-Encoding, or two Content-Lengths, never reaches it; how the
bytes were split does not change which requests got through.
"""

from __future__ import annotations

import asyncio
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.messages import Request, Response, fixed_body
from sidecar.serving import ListenerContext, ResponseSink
from tests.unit.memtransport import attach

BOUNDED = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
LIMITS = LimitsConfig(max_request_line=1024, max_header_bytes=2048, header_read_timeout=5.0)

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /k HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nX-A: b\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
]
PIECES = [b"\r\n", b"\n", b"\r", b" ", b":", b"\x00", b"Content-Length: 5\r\n",
          b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n", b"\t", b"\xff"]  # fmt: skip


async def _drive(chunks: list[bytes]) -> tuple[list[Request], bytes, bool]:
    seen: list[Request] = []

    async def handler(request: Request, sink: ResponseSink) -> None:
        # The body is left unread: a body-framing error after the head is a known hang
        # (tests/hostile/test_h1_hostile.py::test_bad_body_framing_fails_the_call_promptly).
        seen.append(request)
        await sink.send(Response(200, [], fixed_body(b"ok")))

    ctx = ListenerContext("fuzz", handler, Http2ServerConfig(), LIMITS)
    proto = H1ServerProtocol(ctx)
    transport = attach(proto)
    for chunk in chunks:
        if transport.closed:
            break
        proto.data_received(chunk)
        await asyncio.sleep(0)
    for _ in range(2000):  # bounded: no wall-clock waits
        if transport.closed or (proto._active is None and ctx.in_flight == 0):
            break
        await asyncio.sleep(0)
    settled = transport.closed or (proto._active is None and ctx.in_flight == 0)
    if not transport.closed:
        transport.close()
        await asyncio.sleep(0)
    return seen, transport.data, settled


def run(chunks: list[bytes]) -> tuple[list[Request], bytes, bool]:
    return asyncio.run(_drive(chunks))


def _clean(request: Request) -> None:
    assert not re.search(rb"[\r\n\x00]", request.path), request.path
    for name, value in request.headers:
        assert re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9a-z]+", name), name
        assert not re.search(rb"[\r\n\x00]", value), value


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


mutated = st.builds(
    lambda base, ops: _mutate(base, ops),
    st.sampled_from(VALID),
    st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 2), st.sampled_from(PIECES)), max_size=6
    ),
)


def _mutate(base: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    data = bytearray(base)
    for pos, kind, piece in ops:
        pos %= len(data) + 1
        if kind == 0:
            data[pos:pos] = piece
        elif kind == 1:
            del data[pos : pos + len(piece)]
        else:
            data[pos : pos + len(piece)] = piece
    return bytes(data)


@BOUNDED
@given(st.binary(max_size=1024))
def test_random_bytes_never_crash_or_hang(data: bytes) -> None:
    seen, _, settled = run([data])
    assert settled
    for request in seen:
        _clean(request)


@BOUNDED
@given(mutated, st.lists(st.integers(0, 2000), max_size=5))
def test_mutated_requests_never_crash_hang_or_pass_unclean(data: bytes, cuts: list[int]) -> None:
    seen, _, settled = run(_splits(data, cuts))
    assert settled
    for request in seen:
        _clean(request)


@BOUNDED
@given(mutated, st.lists(st.integers(0, 2000), min_size=1, max_size=5))
def test_how_bytes_are_split_does_not_change_what_gets_through(
    data: bytes, cuts: list[int]
) -> None:
    whole, _, _ = run([data])
    split, _, _ = run(_splits(data, cuts))
    assert [(r.method, r.path, r.headers) for r in whole] == [
        (r.method, r.path, r.headers) for r in split
    ]


ambiguous_framing = st.builds(
    lambda order, cl, extra: (
        b"POST /x HTTP/1.1\r\nHost: a\r\n"
        + b"".join(order)
        + extra
        + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    ),
    st.permutations([b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"]),
    st.integers(0, 99),
    st.sampled_from([b"", b"Content-Length: 7\r\n", b"X-A: b\r\n"]),
)


@BOUNDED
@given(ambiguous_framing)
def test_content_length_with_transfer_encoding_never_reaches_the_handler(data: bytes) -> None:
    seen, written, settled = run([data])
    assert settled
    assert seen == []
    assert written.startswith(b"HTTP/1.1 400 ")
