"""Property test for the HTTP/1.1 writer's check (sidecar/proto/h1head.py): for any
method, target, authority and fields (every byte value, HTTP/2 pseudo-headers included),
a request head the client writer writes reads back, with httptools and with h11 as two
independent parsers, as exactly the one request written; otherwise nothing is written."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import h11
import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import BadRequest
from sidecar.messages import Request, fixed_body
from sidecar.proto.h1head import last_chunk
from sidecar.upstream.h1conn import H1ClientConnection

BOUNDED = settings(max_examples=200, deadline=2000)
ANY = st.binary(max_size=12)
NICE = st.sampled_from([b"x-a", b"GET", b"/a", b"v", b":path", b"a\r\nx: 1", b"a b", b"a:b"])
part = ANY | NICE


class _Sent:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _write(method: bytes, target: bytes, authority: bytes, fields: list[Any]) -> Any:
    async def go() -> Any:
        pool = SimpleNamespace(max_header_bytes=65536, service="t", release=lambda c, k: None)
        conn = H1ClientConnection(pool, ("127.0.0.1", 1))
        sent = _Sent()
        conn.transport = sent  # type: ignore[assignment]
        request = Request(method, target, authority, fields, fixed_body())
        refused = conn._write_request(request, authority, target)
        return refused, sent.data

    return asyncio.run(go())


class _Record:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.messages = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_message_complete(self) -> None:
        self.messages += 1


@BOUNDED
@given(part, part, part, st.lists(st.tuples(part, part), max_size=4))
def test_a_written_request_head_parses_as_the_one_request_written(
    method: bytes, target: bytes, authority: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    fields = [(n, v) for n, v in fields if n.lower() not in (b"content-length", b"host")]
    refused, data = _write(method, target, authority, fields)
    if refused is not None:
        assert isinstance(refused, BadRequest) and data == b""
        return
    sent = [(b"host", authority), *((n, v) for n, v in fields if n.lower() != b"transfer-encoding")]
    # Parsers strip a value's surrounding whitespace (RFC 9112 5.1): compare stripped.
    expect = [(n.lower(), v.strip(b" \t")) for n, v in sent]
    record = _Record()
    parser = httptools.HttpRequestParser(record)
    try:
        parser.feed_data(data)
    except httptools.HttpParserInvalidMethodError:
        # llhttp knows a fixed list of methods: any other token is refused whole (no
        # split); h11, below, reads it.
        assert method not in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD")
    else:
        assert record.messages == 1 and parser.get_method() == method and record.url == target
        assert record.fields == expect
    h11_server = h11.Connection(h11.SERVER)
    h11_server.receive_data(data)
    event = h11_server.next_event()
    assert isinstance(event, h11.Request)
    assert event.method == method and event.target == target
    assert [(bytes(n), bytes(v)) for n, v in event.headers] == expect
    assert isinstance(h11_server.next_event(), h11.EndOfMessage)


@BOUNDED
@given(st.lists(st.tuples(part, part), max_size=4))
def test_a_trailer_block_is_written_only_if_it_reads_back_as_those_trailers(
    trailers: list[tuple[bytes, bytes]],
) -> None:
    block = last_chunk(trailers)
    if block is None:
        return
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    record = _Record()
    parser = httptools.HttpResponseParser(record)
    parser.feed_data(head + block)
    assert record.messages == 1
    assert record.fields[1:] == [
        (n.lower(), v.strip(b" \t"))
        for n, v in trailers
        if n.lower() not in (b"content-length", b"transfer-encoding", b"host", b"trailer", b"te")
        and n.lower() not in (b"connection", b"keep-alive", b"proxy-connection", b"upgrade")
        and n.lower() not in (b"proxy-authenticate", b"proxy-authorization", b"http2-settings")
    ]
