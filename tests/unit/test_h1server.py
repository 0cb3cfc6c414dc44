"""The HTTP/1.1 listener side, driven with bytes over an in-memory transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.messages import Body, Request, Response, fixed_body
from sidecar.serving import ListenerContext, ResponseSink
from tests.unit.memtransport import MemoryTransport, attach, until

Handler = Callable[[Request, ResponseSink], Awaitable[None]]


class ParsedResponse:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = False


class _Collector:
    """Parses what the server wrote with llhttp's response parser, as a client would."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.responses: list[ParsedResponse] = []

    def on_message_begin(self) -> None:
        self.responses.append(ParsedResponse())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1].headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True


def parse_responses(data: bytes) -> list[ParsedResponse]:
    collector = _Collector()
    collector.parser.feed_data(data)
    return collector.responses


class Conn:
    def __init__(self, handler: Handler, limits: LimitsConfig | None = None) -> None:
        self.ctx = ListenerContext("test", handler, Http2ServerConfig(), limits or LimitsConfig())
        self.proto = H1ServerProtocol(self.ctx)
        self.transport: MemoryTransport = attach(self.proto, ("10.1.2.3", 5555))

    def feed(self, data: bytes) -> None:
        self.proto.data_received(data)

    async def idle(self) -> None:
        """Until no call is in flight and the protocol has nothing left to start."""
        await until(lambda: self.proto._active is None and self.ctx.in_flight == 0)


def reply(body: bytes = b"ok", status: int = 200, headers: list[Any] | None = None) -> Handler:
    async def handler(request: Request, sink: ResponseSink) -> None:
        await sink.send(Response(status, list(headers or []), fixed_body(body)))

    return handler


def recording(seen: list[Request], handler: Handler | None = None) -> Handler:
    inner = handler or reply()

    async def handler_(request: Request, sink: ResponseSink) -> None:
        seen.append(request)
        await inner(request, sink)

    return handler_


def run_one(
    data: bytes, handler: Handler | None = None, limits: LimitsConfig | None = None
) -> tuple[Conn, list[Request]]:
    seen: list[Request] = []

    async def go() -> Conn:
        conn = Conn(recording(seen, handler), limits)
        conn.feed(data)
        await until(lambda: conn.transport.closed or (seen and conn.proto._active is None))
        await conn.idle()
        return conn

    return asyncio.run(go()), seen


def test_simple_get_becomes_a_request_without_hop_by_hop_headers() -> None:
    conn, seen = run_one(
        b"GET /a/b?c=1 HTTP/1.1\r\n"
        b"Host: Payment:8080\r\n"
        b"X-Trace: abc\r\n"
        b"Connection: keep-alive, X-Drop-Me\r\n"
        b"X-Drop-Me: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: gzip\r\n"
        b"Upgrade-Insecure-Requests: 1\r\n"
        b"\r\n"
    )
    (request,) = seen
    assert request.method == b"GET"
    assert request.path == b"/a/b?c=1"
    assert request.authority == b"Payment:8080"
    assert request.headers == [(b"x-trace", b"abc"), (b"upgrade-insecure-requests", b"1")]
    assert request.protocol == "http1"
    assert request.peer == "10.1.2.3:5555"
    assert request.absolute_form is False
    assert request.body.complete
    assert not conn.transport.closed  # keep-alive


def test_te_trailers_is_kept() -> None:
    _, seen = run_one(b"POST /x HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n")
    assert seen[0].headers == [(b"te", b"trailers"), (b"content-length", b"0")]


def test_absolute_form_target() -> None:
    _, seen = run_one(b"GET http://payment:8080/x?y=1 HTTP/1.1\r\nHost: ignored\r\n\r\n")
    (request,) = seen
    assert request.authority == b"payment:8080"
    assert request.path == b"/x?y=1"
    assert request.absolute_form is True


def test_absolute_form_without_port_or_path() -> None:
    _, seen = run_one(b"GET http://payment HTTP/1.1\r\nHost: payment\r\n\r\n")
    assert (seen[0].authority, seen[0].path, seen[0].absolute_form) == (b"payment", b"/", True)


def test_absolute_form_with_an_ipv6_literal_keeps_the_brackets() -> None:
    _, seen = run_one(b"GET http://[::1]:8080/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen[0].authority == b"[::1]:8080"


def test_request_body_with_content_length_and_chunked() -> None:
    bodies: list[bytes] = []

    async def handler(request: Request, sink: ResponseSink) -> None:
        data = b""
        while chunk := await request.body.read():
            data += chunk
        bodies.append(data)
        await sink.send(Response(200, [], fixed_body()))

    async def go() -> Conn:
        conn = Conn(handler)
        conn.feed(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
        await until(lambda: conn.ctx.in_flight == 1)
        conn.feed(b"lo")
        conn.feed(
            b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await until(lambda: len(bodies) == 2)
        await conn.idle()
        return conn

    conn = asyncio.run(go())
    assert bodies == [b"hello", b"abcde"]
    assert len(parse_responses(conn.transport.data)) == 2


def test_response_with_content_length_is_written_as_is() -> None:
    conn, _ = run_one(
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        reply(
            b"hello",
            headers=[
                (b"content-type", b"text/plain"),
                (b"content-length", b"5"),
                (b"connection", b"keep-alive"),  # hop-by-hop: not forwarded
                (b"x-app", b"1"),
            ],
        ),
    )
    assert conn.transport.data == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nx-app: 1\r\n\r\nhello"
    )


def test_complete_body_without_content_length_gets_one() -> None:
    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", reply(b"hey", status=404))
    assert conn.transport.data == b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nhey"


def streaming_handler(trailers: list[tuple[bytes, bytes]] | None = None) -> Handler:
    async def handler(request: Request, sink: ResponseSink) -> None:
        body = Body()
        body.feed(b"hello")
        sending = asyncio.create_task(sink.send(Response(200, [(b"x-a", b"1")], body)))
        await asyncio.sleep(0)
        body.feed(b" world!")
        body.finish(trailers)
        assert await sending == 12

    return handler


def test_streamed_response_without_length_is_chunked() -> None:
    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", streaming_handler())
    assert conn.transport.data == (
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
    )
    (response,) = parse_responses(conn.transport.data)
    assert response.complete and response.body == b"hello world!"
    assert not conn.transport.closed


def test_streamed_response_trailers_go_in_the_last_chunk() -> None:
    conn, _ = run_one(
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", streaming_handler([(b"grpc-status", b"0")])
    )
    assert conn.transport.data.endswith(b"7\r\n world!\r\n0\r\ngrpc-status: 0\r\n\r\n")


def test_head_writes_no_body() -> None:
    conn, _ = run_one(
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", reply(b"hello", headers=[(b"content-length", b"5")])
    )
    assert conn.transport.data == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    assert not conn.transport.closed


def test_head_cancels_a_streamed_body() -> None:
    cancelled: list[bool] = []

    async def handler(request: Request, sink: ResponseSink) -> None:
        body = Body()
        body.on_cancel = lambda: cancelled.append(True)
        body.feed(b"never sent")
        assert await sink.send(Response(200, [], body)) == 0

    conn, _ = run_one(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", handler)
    assert cancelled == [True]
    assert conn.transport.data == b"HTTP/1.1 200 OK\r\n\r\n"


def test_204_has_no_body_or_length() -> None:
    conn, _ = run_one(b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n", reply(b"", status=204))
    assert conn.transport.data == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_pipelined_requests_are_answered_in_order() -> None:
    async def go() -> tuple[Conn, list[Request], bool]:
        gate = asyncio.Event()
        seen: list[Request] = []

        async def handler(request: Request, sink: ResponseSink) -> None:
            seen.append(request)
            if request.path == b"/first":
                await gate.wait()
            await sink.send(Response(200, [], fixed_body(request.path)))

        conn = Conn(handler)
        conn.feed(
            b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        await until(lambda: len(seen) == 1)
        await asyncio.sleep(0)
        paused_while_queued = conn.transport.reading_paused
        assert conn.transport.data == b""  # nothing overtakes the first reply
        gate.set()
        await until(lambda: len(seen) == 3)
        await conn.idle()
        return conn, seen, paused_while_queued

    conn, seen, paused_while_queued = asyncio.run(go())
    assert [r.path for r in seen] == [b"/first", b"/second", b"/third"]
    assert [r.body for r in parse_responses(conn.transport.data)] == [
        b"/first",
        b"/second",
        b"/third",
    ]
    assert paused_while_queued
    assert not conn.transport.reading_paused


def test_request_body_backpressure_pauses_and_resumes_reading() -> None:
    async def go() -> tuple[bool, bool, int]:
        gate = asyncio.Event()
        received = 0

        async def handler(request: Request, sink: ResponseSink) -> None:
            nonlocal received
            await gate.wait()
            while chunk := await request.body.read():
                received += len(chunk)
            await sink.send(Response(200, [], fixed_body()))

        conn = Conn(handler)
        size = 400 * 1024
        conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 16384):
            conn.feed(b"x" * 16384)
        await until(lambda: conn.ctx.in_flight == 1)
        paused = conn.transport.reading_paused
        gate.set()
        await conn.idle()
        return paused, conn.transport.reading_paused, received

    paused, paused_after, received = asyncio.run(go())
    assert paused  # 400 KiB unread is over the 256 KiB high-water mark
    assert not paused_after
    assert received == 400 * 1024


def rejection(conn: Conn) -> tuple[int, dict[str, Any]]:
    (response,) = parse_responses(conn.transport.data)
    assert response.headers[b"connection"] == b"close"
    assert response.headers[b"content-type"] == b"application/json"
    return response.status, json.loads(response.body)


def test_malformed_request_is_400_json_and_closes() -> None:
    conn, seen = run_one(b"NOT A REQUEST\r\n\r\n")
    assert seen == []
    status, payload = rejection(conn)
    assert status == 400
    assert payload["status"] == 400
    assert "malformed" in payload["error"]
    assert conn.transport.closed


def test_oversized_request_line_is_rejected_before_the_handler() -> None:
    conn, seen = run_one(
        b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        limits=LimitsConfig(max_request_line=64),
    )
    assert seen == []
    assert conn.transport.closed
    assert rejection(conn)[0] >= 400


def test_request_line_over_the_limit_is_414() -> None:
    conn, _ = run_one(
        b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        limits=LimitsConfig(max_request_line=64),
    )
    assert rejection(conn)[0] == 414


def test_oversized_headers_are_rejected_before_the_handler() -> None:
    conn, seen = run_one(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 200 + b"\r\n\r\n",
        limits=LimitsConfig(max_header_bytes=128),
    )
    assert seen == []
    assert conn.transport.closed
    assert rejection(conn)[0] >= 400


def test_headers_over_the_limit_are_431() -> None:
    conn, _ = run_one(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 200 + b"\r\n\r\n",
        limits=LimitsConfig(max_header_bytes=128),
    )
    assert rejection(conn)[0] == 431


def test_a_head_that_never_ends_is_431_once_past_the_limit_and_a_request_line() -> None:
    """A head that keeps coming (one field, never ended) is refused as its bytes pass the
    limit plus a request line's, before it completes: the parser never buffers more."""
    limits = LimitsConfig(max_header_bytes=1024, max_request_line=1024)

    async def go() -> Conn:
        conn = Conn(recording([], None), limits)
        conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        fed = 0
        while not conn.transport.closed and fed < 64:
            conn.feed(b"v" * 512)
            fed += 1
        assert 1024 + 1024 < fed * 512 <= 1024 + 1024 + 4096 + 512
        return conn

    conn = asyncio.run(go())
    assert rejection(conn)[0] == 431


def test_a_head_under_the_limit_in_a_read_with_its_body_is_not_431() -> None:
    """The bytes of one read may hold a body after the head: the head is then counted
    exactly, field by field."""
    body = b"b" * 4096
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4096\r\n\r\n" + body
    conn, seen = run_one(data, limits=LimitsConfig(max_header_bytes=128))
    assert len(seen) == 1 and parse_responses(conn.transport.data)[0].status == 200


def test_connection_close_closes_after_the_reply() -> None:
    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", reply(b"bye"))
    (response,) = parse_responses(conn.transport.data)
    assert response.body == b"bye"
    assert response.headers[b"connection"] == b"close"
    assert conn.transport.closed


def test_http10_without_keep_alive_closes() -> None:
    conn, _ = run_one(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", reply(b"old"))
    assert conn.transport.data == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nold"
    )
    assert conn.transport.closed


def test_http10_with_keep_alive_stays_open() -> None:
    conn, _ = run_one(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", reply(b"old"))
    assert parse_responses(conn.transport.data)[0].body == b"old"
    assert not conn.transport.closed


def test_streamed_response_to_http10_is_not_chunked() -> None:
    conn, _ = run_one(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", streaming_handler())
    head, _, body = conn.transport.data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head
    assert body == b"hello world!"
    assert conn.transport.closed


def test_draining_listener_closes_after_the_reply() -> None:
    async def go() -> Conn:
        conn = Conn(reply(b"last"))
        conn.ctx.draining = True
        conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await until(lambda: conn.transport.closed)
        return conn

    conn = asyncio.run(go())
    assert parse_responses(conn.transport.data)[0].headers[b"connection"] == b"close"


def test_close_if_idle_closes_only_an_idle_keep_alive() -> None:
    async def go() -> tuple[bool, bool]:
        gate = asyncio.Event()

        async def handler(request: Request, sink: ResponseSink) -> None:
            await gate.wait()
            await sink.send(Response(200, [], fixed_body()))

        conn = Conn(handler)
        conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await until(lambda: conn.ctx.in_flight == 1)
        conn.proto.close_if_idle()
        busy_closed = conn.transport.closed
        gate.set()
        await conn.idle()
        conn.proto.close_if_idle()
        return busy_closed, conn.transport.closed

    assert asyncio.run(go()) == (False, True)


def test_client_disconnect_cancels_the_handler_and_fails_the_body() -> None:
    async def go() -> tuple[list[str], int]:
        events: list[str] = []

        async def handler(request: Request, sink: ResponseSink) -> None:
            try:
                await request.body.read()
                await request.body.read()
            except Exception as exc:
                events.append(type(exc).__name__)
                raise
            except asyncio.CancelledError:
                events.append("cancelled")
                raise

        conn = Conn(handler)
        conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        await until(lambda: conn.ctx.in_flight == 1)
        await asyncio.sleep(0)
        conn.transport.close()
        await until(lambda: conn.ctx.in_flight == 0)
        return events, len(conn.ctx.connections)

    events, open_connections = asyncio.run(go())
    assert events in (["BodyError"], ["cancelled"])
    assert open_connections == 0


def test_connect_is_501() -> None:
    conn, seen = run_one(b"CONNECT payment:443 HTTP/1.1\r\nHost: payment:443\r\n\r\n")
    assert seen == []
    assert rejection(conn)[0] == 501
    assert conn.transport.closed


def test_connect_is_refused_and_closed() -> None:
    conn, seen = run_one(b"CONNECT payment:443 HTTP/1.1\r\nHost: payment:443\r\n\r\n")
    assert seen == []
    assert conn.transport.closed
    assert rejection(conn)[0] >= 400


def test_upgrade_request_still_gets_a_reply() -> None:
    conn, seen = run_one(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        reply(b"plain"),
    )
    assert len(seen) == 1
    responses = parse_responses(conn.transport.data)
    assert responses and responses[0].status in (200, 501)


# -- issue 15: the HTTP/1.1 boundary ---------------------------------------------------


def test_a_second_host_header_is_400() -> None:
    conn, seen = run_one(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert seen == []
    status, payload = rejection(conn)
    assert status == 400 and "Host" in payload["error"]


def test_an_http11_request_without_host_is_400_but_http10_may_omit_it() -> None:
    conn, seen = run_one(b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n")
    assert seen == []
    status, payload = rejection(conn)
    assert status == 400 and "Host" in payload["error"]
    conn, seen = run_one(b"GET / HTTP/1.0\r\n\r\n")
    assert len(seen) == 1 and seen[0].authority == b""
    assert conn.transport.data.startswith(b"HTTP/1.1 200 OK")


def test_an_unimplemented_transfer_coding_is_501_naming_it() -> None:
    conn, seen = run_one(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    assert seen == []
    status, payload = rejection(conn)
    assert status == 501 and "'gzip'" in payload["error"]


def test_a_transfer_encoding_not_ending_in_chunked_is_400() -> None:
    conn, seen = run_one(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nab")
    assert seen == []
    assert rejection(conn)[0] == 400


CHUNKED_POST = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


def test_request_trailers_are_their_own_block_never_headers() -> None:
    _, seen = run_one(CHUNKED_POST + b"0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Sum: 1\r\n\r\n")
    (request,) = seen
    assert all(name != b"x-forwarded-for" for name, _ in request.headers)
    assert request.body.trailers == [(b"x-forwarded-for", b"6.6.6.6"), (b"x-sum", b"1")]


def body_reader() -> Handler:
    """A handler that reads the whole body first, as hmac_sign does, and answers 500 when
    that fails (as a failed filter would)."""

    async def handler(request: Request, sink: ResponseSink) -> None:
        try:
            while await request.body.read():
                pass
        except Exception:
            await sink.send(Response(500, [], fixed_body(b"filter failed")))
            return
        await sink.send(Response(200, [], fixed_body(b"ok")))

    return handler


def test_a_framing_field_in_request_trailers_is_400_even_after_the_call_began() -> None:
    for trailer in (b"content-length: 5", b"transfer-encoding: chunked", b"host: evil"):
        conn, _ = run_one(CHUNKED_POST + b"0\r\n" + trailer + b"\r\n\r\n", body_reader())
        status, _ = rejection(conn)
        assert status == 400, trailer
        assert b"filter failed" not in conn.transport.data


def test_request_trailers_count_into_max_header_bytes() -> None:
    limits = LimitsConfig(max_header_bytes=1024)
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 100) for i in range(20))
    conn, _ = run_one(CHUNKED_POST + b"0\r\n" + trailers + b"\r\n", body_reader(), limits)
    status, payload = rejection(conn)
    assert status == 431 and "trailers" in payload["error"]


def test_a_response_trailer_that_would_split_the_response_is_dropped() -> None:
    forged = b"0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
    for trailer in ((b"grpc-status", forged), (b"x a", b"1"), (b"x-b", b"\x01")):
        conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", streaming_handler([trailer]))
        assert conn.transport.data.endswith(b"7\r\n world!\r\n0\r\n\r\n"), trailer
        assert len(parse_responses(conn.transport.data)) == 1


def test_framing_fields_in_response_trailers_are_left_out() -> None:
    trailers = [(b"content-length", b"9"), (b"grpc-status", b"0")]
    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", streaming_handler(trailers))
    assert conn.transport.data.endswith(b"0\r\ngrpc-status: 0\r\n\r\n")


def test_a_response_field_http11_cannot_carry_is_refused() -> None:
    for header in (
        (b"x a", b"1"),
        (b"x:a", b"1"),
        (b"", b"1"),
        (b"x-a", b"\x7f"),
        (b"x-a", b"1\x0b"),
    ):
        conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", reply(headers=[header]))
        assert conn.transport.data.startswith(b"HTTP/1.1 500 "), header


def test_a_response_content_length_the_body_does_not_have_is_refused() -> None:
    headers = [(b"content-length", b"2")]
    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", reply(b"ok" * 10, headers=headers))
    assert conn.transport.data.startswith(b"HTTP/1.1 500 ")
    twice = [(b"content-length", b"2"), (b"content-length", b"2")]
    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", reply(b"ok", headers=twice))
    assert conn.transport.data.startswith(b"HTTP/1.1 500 ")


def test_a_streamed_body_over_its_content_length_closes_instead_of_running_on() -> None:
    async def handler(request: Request, sink: ResponseSink) -> None:
        body = Body()
        body.feed(b"ok")
        sending = asyncio.create_task(sink.send(Response(200, [(b"content-length", b"2")], body)))
        await asyncio.sleep(0)
        body.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
        body.finish()
        await sending

    conn, _ = run_one(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", handler)
    assert b"forged" not in conn.transport.data
    assert conn.transport.closed
