"""HTTP/2 paths: the upstream client connection against the listener's server
protocol (or a hand-driven h2 peer) over the in-memory transport pair."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame

from sidecar.adapters.h2server import H2ServerProtocol
from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.discovery.base import Endpoint
from sidecar.errors import StreamRefused, UpstreamReset
from sidecar.listener import Listener, _Detect
from sidecar.messages import Body, BodyError, Request, Response, fixed_body
from sidecar.metrics import Metrics
from sidecar.serving import ListenerContext, ResponseSink
from sidecar.upstream import h2pool
from sidecar.upstream.h2client import H2ClientConnection
from sidecar.upstream.h2pool import H2Pool
from sidecar.upstream.pool import PoolLimits
from tests.unit.memtransport import MemoryTransport, connect, until

Handler = Callable[[Request, ResponseSink], Awaitable[None]]
CANCEL = h2.errors.ErrorCodes.CANCEL
REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM


def make_ctx(handler: Handler, **http2: Any) -> ListenerContext:
    return ListenerContext("test", handler, Http2ServerConfig(**http2), LimitsConfig())


class Served:
    """An upstream client connection joined to a listener (through protocol detection)."""

    def __init__(self, handler: Handler, **http2: Any) -> None:
        self.ctx = make_ctx(handler, **http2)
        self.client = H2ClientConnection()
        self.client_transport, self.server_transport = connect(self.client, _Detect(self.ctx))

    @property
    def server(self) -> H2ServerProtocol:
        proto = self.server_transport.get_protocol()
        assert isinstance(proto, H2ServerProtocol)
        return proto


class RawPeer(asyncio.Protocol):
    """A hand-driven h2 server: the test decides every frame it sends."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.events: list[h2.events.Event] = []
        self.transport: MemoryTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.events += self.h2.receive_data(data)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def request_ids(self) -> list[int]:
        return [e.stream_id for e in self.events if isinstance(e, h2.events.RequestReceived)]

    def resets(self) -> dict[int, int]:
        return {
            e.stream_id: e.error_code for e in self.events if isinstance(e, h2.events.StreamReset)
        }

    def respond(self, stream_id: int, status: int = 200, *, end: bool = False) -> None:
        self.h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=end)
        self.flush()

    def data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        size = self.h2.max_outbound_frame_size
        frames = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for i, frame in enumerate(frames):
            self.h2.send_data(stream_id, frame, end_stream=end and i == len(frames) - 1)
        self.flush()

    def reset(self, stream_id: int, code: int) -> None:
        self.h2.reset_stream(stream_id, code)
        self.flush()

    def goaway(self, last_stream_id: int) -> None:
        """GOAWAY(NO_ERROR) beside h2, so this peer can still finish the streams below it."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = 0
        assert self.transport is not None
        self.transport.write(frame.serialize())


def to_raw_peer() -> tuple[H2ClientConnection, RawPeer]:
    client, peer = H2ClientConnection(), RawPeer()
    connect(client, peer)
    return client, peer


def request(path: bytes = b"/", body: Body | None = None, method: bytes = b"GET") -> Request:
    return Request(method, path, b"svc", [(b"content-type", b"text/plain")], body or fixed_body())


async def call(
    client: H2ClientConnection, path: bytes = b"/", body: Body | None = None
) -> Response:
    client.reserved += 1  # the slot a pool would have reserved
    return await client.request(request(path, body, b"POST" if body else b"GET"), b"svc", path)


async def read_all(body: Body) -> bytes:
    data = b""
    while chunk := await body.read():
        data += chunk
    return data


def test_round_trip_with_body_and_trailers() -> None:
    seen: list[tuple[Request, bytes]] = []

    async def handler(req: Request, sink: ResponseSink) -> None:
        data = await read_all(req.body)
        seen.append((req, data))
        out = fixed_body(data.upper(), [(b"x-checksum", b"42")])
        await sink.send(Response(201, [(b"content-type", b"text/plain")], out))

    async def go() -> tuple[Response, bytes, Served]:
        served = Served(handler)
        body = Body()
        body.feed(b"hello ")
        response_task = asyncio.create_task(call(served.client, b"/echo?x=1", body))
        await asyncio.sleep(0)
        body.feed(b"world")
        body.finish([(b"x-sent", b"2")])
        response = await asyncio.wait_for(response_task, 5)
        data = await read_all(response.body)
        await until(lambda: not served.client.streams and not served.server.streams)
        return response, data, served

    response, data, served = asyncio.run(go())
    ((req, sent),) = seen
    assert (req.method, req.path, req.authority, req.scheme) == (
        b"POST",
        b"/echo?x=1",
        b"svc",
        b"http",
    )
    assert req.protocol == "h2c"
    assert req.headers == [(b"content-type", b"text/plain")]
    assert sent == b"hello world"
    assert req.body.trailers == [(b"x-sent", b"2")]
    assert response.status == 201
    assert response.headers == [(b"content-type", b"text/plain")]
    assert data == b"HELLO WORLD"
    assert response.body.trailers == [(b"x-checksum", b"42")]
    assert served.ctx.in_flight == 0


def test_bodies_bigger_than_the_initial_windows_complete() -> None:
    request_body = bytes(range(256)) * 800  # 200 KiB: over the listener's 64 KiB stream window
    response_body = b"r" * (600 * 1024)  # over the client's 256 KiB stream window

    async def handler(req: Request, sink: ResponseSink) -> None:
        got = await read_all(req.body)
        assert got == request_body
        await sink.send(Response(200, [], fixed_body(response_body)))

    async def go() -> bytes:
        served = Served(handler)
        response = await asyncio.wait_for(call(served.client, b"/big", fixed_body(request_body)), 5)
        return await asyncio.wait_for(read_all(response.body), 5)

    assert asyncio.run(go()) == response_body


def test_listener_drain_sends_goaway_and_lets_the_open_stream_finish() -> None:
    gate = asyncio.Event

    async def go() -> None:
        release = gate()
        handled: list[bytes] = []

        async def handler(req: Request, sink: ResponseSink) -> None:
            handled.append(req.path)
            await release.wait()
            await sink.send(Response(200, [], fixed_body(b"finished")))

        served = Served(handler)
        first = asyncio.create_task(call(served.client, b"/first"))
        await until(lambda: served.ctx.in_flight == 1)
        Listener(served.ctx, "127.0.0.1", 0).begin_drain()
        await until(lambda: served.client.goaway)
        assert not served.client.usable
        assert not served.client.has_capacity()
        with pytest.raises(StreamRefused):
            await call(served.client, b"/late")
        assert not served.server_transport.closed  # stream 1 is still running
        release.set()
        response = await asyncio.wait_for(first, 5)
        assert await read_all(response.body) == b"finished"
        await until(lambda: served.server_transport.closed and served.client.closed)
        assert handled == [b"/first"]

    asyncio.run(go())


def test_server_goaway_refuses_a_stream_that_crossed_it() -> None:
    async def go() -> None:
        release = asyncio.Event()
        handled: list[bytes] = []

        async def handler(req: Request, sink: ResponseSink) -> None:
            handled.append(req.path)
            await release.wait()
            await sink.send(Response(200, [], fixed_body(b"one")))

        served = Served(handler)
        first = asyncio.create_task(call(served.client, b"/one"))
        await until(lambda: served.ctx.in_flight == 1)
        crossing = asyncio.create_task(call(served.client, b"/three"))
        await until(lambda: 3 in served.client.streams)  # HEADERS(3) is on the wire
        served.server.send_goaway()  # last_stream_id=1: the server has not seen 3
        with pytest.raises(StreamRefused):
            await asyncio.wait_for(crossing, 5)
        release.set()
        assert await read_all((await asyncio.wait_for(first, 5)).body) == b"one"
        assert handled == [b"/one"]

    asyncio.run(go())


def test_goaway_from_a_peer_refuses_streams_above_last_id_and_finishes_the_rest() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        calls = [asyncio.create_task(call(client, b"/%d" % i)) for i in range(3)]
        await until(lambda: peer.request_ids() == [1, 3, 5])
        peer.respond(1)
        peer.goaway(last_stream_id=1)
        response = await asyncio.wait_for(calls[0], 5)
        for refused in calls[1:]:
            with pytest.raises(StreamRefused):
                await asyncio.wait_for(refused, 5)
        assert client.goaway and not client.closed
        assert list(client.streams) == [1]
        peer.data(1, b"tail", end=True)
        assert await asyncio.wait_for(read_all(response.body), 5) == b"tail"
        # Its last stream done, the client leaves too.
        await until(lambda: client.closed)
        await until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in peer.events))

    asyncio.run(go())


def test_refused_stream_reset_is_stream_refused() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        pending = asyncio.create_task(call(client))
        await until(lambda: peer.request_ids() == [1])
        peer.reset(1, REFUSED)
        with pytest.raises(StreamRefused):
            await asyncio.wait_for(pending, 5)
        assert client.streams == {}
        assert client.usable  # one refused stream does not spoil the connection

    asyncio.run(go())


def test_other_resets_are_upstream_reset_before_the_head_and_body_error_after() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        before = asyncio.create_task(call(client))
        after = asyncio.create_task(call(client))
        await until(lambda: peer.request_ids() == [1, 3])
        peer.reset(1, h2.errors.ErrorCodes.INTERNAL_ERROR)
        with pytest.raises(UpstreamReset):
            await asyncio.wait_for(before, 5)
        peer.respond(3)
        peer.data(3, b"half")
        response = await asyncio.wait_for(after, 5)
        assert await response.body.read() == b"half"
        peer.reset(3, h2.errors.ErrorCodes.INTERNAL_ERROR)
        with pytest.raises(BodyError):
            await asyncio.wait_for(response.body.read(), 5)

    asyncio.run(go())


def test_no_error_reset_before_end_stream_is_not_a_complete_response() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        pending = asyncio.create_task(call(client))
        await until(lambda: peer.request_ids() == [1])
        peer.respond(1)
        peer.data(1, b"trunc")
        response = await asyncio.wait_for(pending, 5)
        peer.reset(1, h2.errors.ErrorCodes.NO_ERROR)
        assert await response.body.read() == b"trunc"
        with pytest.raises(BodyError):
            await asyncio.wait_for(response.body.read(), 5)

    asyncio.run(go())


def test_an_empty_data_frame_does_not_end_the_response_body() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        pending = asyncio.create_task(call(client))
        await until(lambda: peer.request_ids() == [1])
        peer.respond(1)
        peer.data(1, b"a")
        peer.data(1, b"")
        peer.data(1, b"b", end=True)
        response = await asyncio.wait_for(pending, 5)
        assert await asyncio.wait_for(read_all(response.body), 5) == b"ab"

    asyncio.run(go())


def test_cancelling_the_response_body_resets_the_stream() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        pending = asyncio.create_task(call(client))
        await until(lambda: peer.request_ids() == [1])
        peer.respond(1)
        peer.data(1, b"some")
        response = await asyncio.wait_for(pending, 5)
        response.body.cancel()
        await until(lambda: 1 in peer.resets())
        assert peer.resets() == {1: CANCEL}
        assert client.streams == {}
        assert client.usable  # only the stream ended

    asyncio.run(go())


def test_cancelled_responses_give_their_unread_window_back() -> None:
    stream_window = 256 * 1024  # the client's INITIAL_WINDOW_SIZE; 4 of them fill 1 MiB

    async def go() -> None:
        client, peer = to_raw_peer()
        for stream_id in (1, 3, 5, 7):
            pending = asyncio.create_task(call(client))
            await until(lambda sid=stream_id: sid in peer.request_ids())  # type: ignore[misc]
            peer.respond(stream_id)
            peer.data(stream_id, b"x" * stream_window)
            response = await asyncio.wait_for(pending, 5)
            await until(lambda r=response: r.body.buffered == stream_window)  # type: ignore[misc]
            response.body.cancel()  # the caller went away without reading
            await until(lambda sid=stream_id: sid in peer.resets())  # type: ignore[misc]
        await until(lambda: peer.h2.outbound_flow_control_window > 0, turns=200)

    asyncio.run(go())


def test_streams_reset_by_the_client_give_their_unread_window_back() -> None:
    async def go() -> None:
        async def handler(req: Request, sink: ResponseSink) -> None:
            await asyncio.Event().wait()  # never reads the body

        served = Served(handler)
        for _ in range(16):  # 16 x 64 KiB stream windows fill the 1 MiB connection window
            pending = asyncio.create_task(call(served.client, b"/", fixed_body(b"x" * 65535)))
            await until(lambda: served.ctx.in_flight == 1)
            await until(
                lambda: served.client.h2.local_flow_control_window(max(served.client.streams)) == 0
            )
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            await until(lambda: served.ctx.in_flight == 0)
        await until(lambda: served.client.h2.outbound_flow_control_window >= 512 * 1024, turns=200)

    asyncio.run(go())


def test_cancelling_the_request_task_resets_the_stream() -> None:
    async def go() -> None:
        client, peer = to_raw_peer()
        pending = asyncio.create_task(call(client))
        await until(lambda: peer.request_ids() == [1])
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await until(lambda: 1 in peer.resets())
        assert peer.resets() == {1: CANCEL}
        assert client.streams == {}

    asyncio.run(go())


def test_client_cancel_cancels_the_listener_handler() -> None:
    async def go() -> None:
        outcome: list[str] = []

        async def handler(req: Request, sink: ResponseSink) -> None:
            body = Body()
            body.feed(b"first")
            try:
                await sink.send(Response(200, [], body))  # never finishes
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

        served = Served(handler)
        response = await asyncio.wait_for(call(served.client), 5)
        assert await response.body.read() == b"first"
        response.body.cancel()
        await until(lambda: outcome == ["cancelled"])
        await until(lambda: served.ctx.in_flight == 0 and not served.server.streams)
        assert not served.server_transport.closed  # only the stream ended

    asyncio.run(go())


def test_pool_opens_no_second_connection_while_the_first_has_capacity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def go() -> None:
        release = asyncio.Event()

        async def handler(req: Request, sink: ResponseSink) -> None:
            await release.wait()
            await sink.send(Response(200, [], fixed_body(req.path)))

        ctx = make_ctx(handler)
        connects: list[tuple[str, int]] = []

        async def fake_connect_h2(
            host: str,
            port: int,
            timeout: float,
            on_change: Any = None,
            keepalive: Any = None,
            timers: Any = None,
        ) -> H2ClientConnection:
            connects.append((host, port))
            await asyncio.sleep(0)  # connecting takes a loop turn: the second call overlaps it
            client = H2ClientConnection(on_change)
            connect(client, _Detect(ctx))
            return client

        monkeypatch.setattr(h2pool, "connect_h2", fake_connect_h2)
        pool = H2Pool("payment", PoolLimits(), Metrics())
        endpoint = Endpoint("10.0.0.9", 15006)
        calls = [
            asyncio.create_task(pool.request(endpoint, request(p), b"payment", p))
            for p in (b"/a", b"/b")
        ]
        await until(lambda: ctx.in_flight == 2)
        assert connects == [("10.0.0.9", 15006)]
        assert pool.connection_count() == 1
        assert pool.snapshot(endpoint)["connections"][0]["active_streams"] == 2
        release.set()
        responses = await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert [await read_all(r.body) for r in responses] == [b"/a", b"/b"]
        third = await asyncio.wait_for(pool.request(endpoint, request(b"/c"), b"payment", b"/c"), 5)
        assert await read_all(third.body) == b"/c"
        assert len(connects) == 1
        pool.close()
        assert pool.connection_count() == 0

    asyncio.run(go())


def test_pool_opens_another_connection_when_the_peer_allows_one_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def go() -> None:
        release = asyncio.Event()

        async def handler(req: Request, sink: ResponseSink) -> None:
            await release.wait()
            await sink.send(Response(200, [], fixed_body()))

        ctx = make_ctx(handler, max_concurrent_streams=1)
        connects: list[H2ClientConnection] = []

        async def fake_connect_h2(
            host: str,
            port: int,
            timeout: float,
            on_change: Any = None,
            keepalive: Any = None,
            timers: Any = None,
        ) -> H2ClientConnection:
            client = H2ClientConnection(on_change)
            connects.append(client)
            connect(client, _Detect(ctx))
            await until(lambda: client.max_streams == 1)  # the listener's SETTINGS arrived
            return client

        monkeypatch.setattr(h2pool, "connect_h2", fake_connect_h2)
        pool = H2Pool("payment", PoolLimits(), Metrics())
        endpoint = Endpoint("10.0.0.9", 15006)
        calls = [
            asyncio.create_task(pool.request(endpoint, request(p), b"payment", p))
            for p in (b"/a", b"/b")
        ]
        await until(lambda: ctx.in_flight == 2)
        assert len(connects) == 2
        assert [c.active for c in connects] == [1, 1]
        release.set()
        responses = await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert [r.status for r in responses] == [200, 200]
        pool.close()

    asyncio.run(go())
