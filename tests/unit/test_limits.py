"""Connection timeouts and limits (limits.*), driven with bytes over in-memory transports.

The loop's clock is moved by hand (`FakeClockLoop`), so a 60 s idle timeout is tested
without waiting: every timer reads loop.time(), which is real time plus an offset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import pytest

from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.listener import H2_PREFACE, _Detect
from sidecar.messages import Body, BodyError, Request, Response, fixed_body
from sidecar.serving import Admission, ListenerContext, ResponseSink
from tests.unit.memtransport import MemoryTransport, attach

T = TypeVar("T")
Handler = Callable[[Request, ResponseSink], Awaitable[None]]

LIMITS = LimitsConfig(
    header_read_timeout=10.0, preface_timeout=10.0, idle_timeout=60.0, body_read_timeout=30.0
)
GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


class FakeClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def run(coro: Coroutine[Any, Any, T]) -> T:
    # No wait_for here: its deadline would read the moved clock (pytest's timeout guards).
    loop = FakeClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def advance(seconds: float) -> None:
    """Move the loop's clock on and let due timers (and what they schedule) run."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, FakeClockLoop)
    loop.offset += seconds
    for _ in range(20):
        await asyncio.sleep(0)


async def ok(request: Request, sink: ResponseSink) -> None:
    await sink.send(Response(200, [], fixed_body(b"ok")))


class Listener:
    """A listener context and the connections a test opens on it, as accept would."""

    def __init__(
        self,
        handler: Handler = ok,
        limits: LimitsConfig = LIMITS,
        admission: Admission | None = None,
    ) -> None:
        self.ctx = ListenerContext("test", handler, Http2ServerConfig(), limits, admission)
        self.timeouts: list[str] = []
        self.refusals: list[str] = []
        self.ctx.on_timeout = self.timeouts.append
        self.ctx.on_refuse = self.refusals.append

    def connect(self, port: int = 40000) -> MemoryTransport:
        return attach(_Detect(self.ctx), ("127.0.0.1", port))


def feed(transport: MemoryTransport, data: bytes) -> None:
    assert transport.protocol is not None
    transport.protocol.data_received(data)


# -- protocol detection and the HTTP/2 preface --


def test_a_silent_connection_is_closed_after_preface_timeout() -> None:
    async def go() -> None:
        listener = Listener()
        conn = listener.connect()
        await advance(9.5)
        assert not conn.closed
        await advance(1.0)
        assert conn.closed
        assert listener.timeouts == ["preface"]
        assert not listener.ctx.connections

    run(go())


def test_a_partial_http2_preface_is_closed_after_preface_timeout() -> None:
    async def go() -> None:
        listener = Listener()
        conn = listener.connect()
        feed(conn, H2_PREFACE[:10])
        await advance(10.5)
        assert conn.closed
        assert listener.timeouts == ["preface"]

    run(go())


def test_a_preface_without_settings_is_closed_counting_from_accept() -> None:
    """The whole preface, then nothing: the client's SETTINGS never come."""

    async def go() -> None:
        listener = Listener()
        conn = listener.connect()
        await advance(4.0)
        feed(conn, H2_PREFACE)
        await advance(5.0)
        assert not conn.closed
        await advance(1.5)  # 10.5 s after accept
        assert conn.closed
        assert listener.timeouts == ["preface"]

    run(go())


# -- HTTP/1.1 --


def test_http1_head_deadline_counts_from_the_connections_first_byte() -> None:
    """A head trickled so that its first bytes look like the HTTP/2 preface: the header
    timeout runs from the first byte, not from when HTTP/1.1 was picked."""

    async def go() -> None:
        listener = Listener()
        conn = listener.connect()
        feed(conn, b"P")
        await advance(9.0)
        feed(conn, b"OST /a HTTP/1.1\r\n")
        await advance(1.5)
        assert conn.closed
        assert conn.data.startswith(b"HTTP/1.1 408 ")
        assert listener.timeouts == ["header"]

    run(go())


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout() -> None:
    async def go() -> None:
        listener = Listener()
        conn = listener.connect()
        feed(conn, GET)
        await advance(0)
        assert conn.data.startswith(b"HTTP/1.1 200 ")
        await advance(50.0)
        feed(conn, GET)  # a second call restarts the idle time
        await advance(0)
        await advance(50.0)
        assert not conn.closed
        assert conn.data.count(b"HTTP/1.1 200 ") == 2
        await advance(11.0)
        assert conn.closed
        assert listener.timeouts == ["idle"]

    run(go())


def test_a_long_call_is_not_cut_by_the_idle_timeout() -> None:
    release = asyncio.Event

    async def go() -> None:
        done = release()

        async def slow(request: Request, sink: ResponseSink) -> None:
            await done.wait()
            await sink.send(Response(200, [], fixed_body(b"late")))

        listener = Listener(slow)
        conn = listener.connect()
        feed(conn, GET)
        await advance(200.0)
        assert not conn.closed
        done.set()
        await advance(0)
        assert conn.data.startswith(b"HTTP/1.1 200 ")

    run(go())


def test_a_stalled_http1_body_is_abandoned_after_body_read_timeout() -> None:
    """Content-Length: 1000000, 3 bytes sent: the call's body fails and the connection
    closes; a body that keeps moving, however slowly, is not cut."""

    async def go() -> None:
        seen: list[BaseException] = []

        async def reader(request: Request, sink: ResponseSink) -> None:
            try:
                while await request.body.read():
                    pass
            except BodyError as exc:
                seen.append(exc)
                raise

        listener = Listener(reader)
        conn = listener.connect()
        feed(conn, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc")
        for _ in range(5):  # a byte every 20 s keeps it open
            await advance(20.0)
            feed(conn, b"d")
        assert not conn.closed
        await advance(31.0)
        assert conn.closed
        assert listener.timeouts == ["body"]
        assert seen and "not received in time" in str(seen[0])

    run(go())


def test_a_body_we_stopped_reading_is_not_timed_out() -> None:
    """Reading paused by backpressure (the handler is not reading): the wait is ours."""

    async def go() -> None:
        hold = asyncio.Event()

        async def unread(request: Request, sink: ResponseSink) -> None:
            await hold.wait()

        listener = Listener(unread)
        conn = listener.connect()
        feed(conn, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        feed(conn, b"x" * 300_000)
        assert conn.reading_paused
        await advance(100.0)
        assert not conn.closed
        hold.set()

    run(go())


# -- HTTP/2 --


class H2Client:
    def __init__(self, conn: MemoryTransport) -> None:
        self.conn = conn
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        feed(self.conn, self.h2.data_to_send())

    def events(self) -> list[h2.events.Event]:
        data = b"".join(self.conn.chunks)
        self.conn.chunks.clear()
        events = self.h2.receive_data(data)
        self.flush()
        return events

    def post(self, stream_id: int, length: int) -> None:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/a"), (":authority", "x")]
        headers.append(("content-length", str(length)))
        self.h2.send_headers(stream_id, headers)
        self.flush()


def test_an_idle_http2_connection_gets_goaway_then_closes() -> None:
    async def go() -> None:
        listener = Listener()
        conn = listener.connect()
        client = H2Client(conn)
        await advance(0)
        client.events()
        await advance(59.0)
        assert not conn.closed
        await advance(2.0)
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events())
        await advance(1.0)  # the GOAWAY's grace
        assert conn.closed
        assert listener.timeouts == ["idle"]

    run(go())


def test_an_open_stream_keeps_an_http2_connection_from_idling() -> None:
    async def go() -> None:
        hold = asyncio.Event()

        async def slow(request: Request, sink: ResponseSink) -> None:
            await hold.wait()
            await sink.send(Response(200, [], fixed_body(b"late")))

        listener = Listener(slow)
        conn = listener.connect()
        client = H2Client(conn)
        client.h2.send_headers(
            1, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
        )
        client.h2.end_stream(1)
        client.flush()
        await advance(200.0)
        assert not conn.closed
        hold.set()
        await advance(0)
        assert any(isinstance(e, h2.events.ResponseReceived) for e in client.events())

    run(go())


def test_a_stalled_http2_body_is_reset_and_other_streams_go_on() -> None:
    async def go() -> None:
        async def reader(request: Request, sink: ResponseSink) -> None:
            while await request.body.read():
                pass
            await sink.send(Response(200, [], fixed_body(b"ok")))

        listener = Listener(reader)
        conn = listener.connect()
        client = H2Client(conn)
        client.post(1, 1_000_000)
        client.h2.send_data(1, b"abc")
        client.flush()
        await advance(25.0)
        client.post(3, 2)  # a bystander stream on the same connection
        await advance(25.0)
        client.h2.send_data(3, b"ok", end_stream=True)  # moved within its 30 s
        client.flush()
        await advance(10.0)
        events = client.events()
        resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert [(e.stream_id, e.error_code) for e in resets] == [(1, 8)]  # CANCEL
        assert any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == 3 for e in events)
        assert listener.ctx.in_flight == 0  # the stalled call ended too
        assert listener.timeouts == ["body"]
        assert not conn.closed

    run(go())


def test_an_answered_http2_stream_is_not_timed_on_its_request_body() -> None:
    """A bidi stream (gRPC): the reply is streaming; the client may be quiet for long."""

    async def go() -> None:
        hold = asyncio.Event()

        async def bidi(request: Request, sink: ResponseSink) -> None:
            body = Body()
            body.feed(b"hello")
            sending = asyncio.ensure_future(sink.send(Response(200, [], body)))
            await hold.wait()
            body.finish()
            await sending

        listener = Listener(bidi)
        conn = listener.connect()
        client = H2Client(conn)
        client.post(1, 1_000_000)
        await advance(0)
        await advance(100.0)
        assert not [e for e in client.events() if isinstance(e, h2.events.StreamReset)]
        assert listener.timeouts == []
        hold.set()
        await advance(0)

    run(go())


# -- connection limits --


def test_connections_beyond_the_listener_limit_are_refused_and_the_open_ones_served() -> None:
    async def go() -> None:
        listener = Listener(limits=LimitsConfig(max_connections=2))
        first, second = listener.connect(1), listener.connect(2)
        third = listener.connect(3)
        await advance(0)
        assert third.closed and not first.closed and not second.closed
        assert listener.refusals == ["max_connections"]
        feed(first, GET)
        await advance(0)
        assert first.data.startswith(b"HTTP/1.1 200 ")
        second.close()
        await advance(0)
        fourth = listener.connect(4)  # room again
        await advance(0)
        assert not fourth.closed

    run(go())


def test_the_fd_budget_is_shared_by_the_listeners() -> None:
    async def go() -> None:
        admission = Admission(fd_budget=3)
        outbound, inbound = Listener(admission=admission), Listener(admission=admission)
        for port in range(3):
            inbound.connect(port)
        refused = outbound.connect(10)
        await advance(0)
        assert refused.closed
        assert outbound.refusals == ["fd_reserve"]
        assert len(inbound.ctx.connections) == 3

    run(go())


@pytest.mark.parametrize("reserve", [0, 128])
def test_the_fd_budget_leaves_the_reserve(reserve: int) -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = Admission.from_rlimit(reserve).fd_budget
    if soft == resource.RLIM_INFINITY:
        assert budget is None
    else:
        assert budget is not None and 0 < budget <= soft - reserve
