"""The HTTP/1.1 server core (sidecar.proto.h1server), driven with bytes and `now` only:
no event loop, no transport. What the adapter would do is recorded by `Events`."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sidecar.config import LimitsConfig
from sidecar.proto.fields import Headers
from sidecar.proto.h1request import BODY, CLOSED, HEAD, IDLE
from sidecar.proto.h1server import BODY_BYTES, HEADER, IDLE_TIME, ServerCore

LIMITS = LimitsConfig(
    header_read_timeout=10.0, idle_timeout=60.0, body_read_timeout=30.0, max_header_bytes=1024
)
GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


class FakeBody:
    def __init__(self) -> None:
        self.buffered = 0
        self.data = b""
        self.trailers: Headers | None = None
        self.complete = False
        self.error: BaseException | None = None

    def feed(self, data: bytes, /) -> object:
        self.data += data
        self.buffered += len(data)
        return None

    def finish(self, trailers: Headers | None = None) -> None:
        self.complete = True
        self.trailers = trailers

    def fail(self, error: BaseException) -> None:
        self.error = error


@dataclass
class Req:
    method: bytes
    target: bytes
    authority: bytes
    headers: Headers
    absolute: bool
    http10: bool
    body: FakeBody = field(default_factory=FakeBody)


class Events:
    def __init__(self) -> None:
        self.requests: list[Req] = []
        self.refused: list[tuple[int, str]] = []
        self.pauses = 0

    def request_received(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        absolute: bool,
        http10: bool,
    ) -> Req:
        request = Req(method, target, authority, headers, absolute, http10)
        self.requests.append(request)
        return request

    def refuse(self, status: int, reason: str) -> None:
        self.refused.append((status, reason))

    def pause_reading(self) -> None:
        self.pauses += 1


def core() -> tuple[ServerCore[Req], Events]:
    events = Events()
    return ServerCore(events, LIMITS, tick=10.0), events


def test_a_request_arrives_whole_and_its_call_becomes_active() -> None:
    conn, _ = core()
    request = conn.receive(b"POST /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 0.0)
    assert request is not None and request is conn.active
    assert (request.method, request.target, request.authority) == (b"POST", b"/a?b", b"x")
    assert request.body.complete and request.body.data == b"hi"
    assert conn.state == IDLE and conn.parsing is None
    assert conn.arrived_keep_alive


def test_the_states_follow_the_bytes() -> None:
    conn, _ = core()
    assert conn.state == IDLE
    conn.receive(b"POST /a HTTP/1.1\r\nHost: x\r\n", 0.0)
    assert conn.state == HEAD and conn.header_deadline == 10.0
    conn.receive(b"Content-Length: 4\r\n\r\nab", 1.0)
    assert conn.state == BODY and conn.header_deadline == 0.0
    assert (conn.deadline, conn.deadline_kind) == (31.0, BODY_BYTES)
    conn.receive(b"cd", 2.0)
    assert conn.state == IDLE
    conn.receive(b"BAD\r\n\r\n", 3.0)
    assert conn.state == CLOSED


def test_pipelined_requests_queue_behind_the_call_and_pause_reading() -> None:
    conn, events = core()
    first = conn.receive(GET + GET, 0.0)
    assert first is not None and len(conn.queue) == 1 and events.pauses == 1
    assert conn.paused and not conn.may_resume()
    following = conn.call_ended(5.0)
    assert following is not None and following[0] is events.requests[1]
    assert conn.active is following[0] and conn.may_resume()
    conn.resumed(5.0)
    assert not conn.paused


def test_idle_after_the_call_not_during_it() -> None:
    conn, _ = core()
    conn.receive(GET, 0.0)
    assert conn.expired(100.0)[0] is None  # the call's turn: never idle
    assert conn.call_ended(100.0) is None
    kind, wake = conn.expired(150.0)
    assert kind is None and wake == 160.0  # a tick on, at most
    assert conn.expired(160.0) == (IDLE_TIME, 0.0)
    assert conn.idle()


def test_a_head_not_received_in_time_is_answered_408() -> None:
    conn, events = core()
    conn.receive(b"GET /a HTTP/1.1\r\nHost: x\r\n", 0.0)
    assert conn.expired(5.0) == (None, 10.0)
    kind, _ = conn.expired(10.0)
    assert kind == HEADER
    conn.timed_out(kind)
    assert events.refused == [(408, "request headers not received in time")]
    assert conn.state == CLOSED
    assert conn.receive(GET, 11.0) is None  # nothing more is parsed


def test_the_first_head_counts_from_the_connections_first_byte() -> None:
    conn, _ = core()
    conn.receive(b"GET /a HTTP/1.1\r\n", 4.0)
    assert conn.first_byte_at(1.0) == 11.0 and conn.header_deadline == 11.0
    assert conn.first_byte_at(3.0) == 0.0  # not earlier: nothing to re-arm


def test_a_stalled_body_times_out_unless_the_wait_is_ours() -> None:
    conn, _ = core()
    request = conn.receive(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nab", 0.0)
    assert request is not None
    conn.paused = True  # backpressure: the handler is not reading
    assert conn.expired(40.0)[0] is None
    conn.paused = False
    kind, _ = conn.expired(71.0)
    assert kind == BODY_BYTES
    conn.timed_out(kind)
    assert request.body.error is not None and "not received in time" in str(request.body.error)


@pytest.mark.parametrize(
    ("wire", "status", "reason"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "one Host header"),
        (b"GET /a HTTP/1.1\r\n\r\n", 400, "must have a Host header"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "gzip"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "end in chunked"),
        (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n", 501, "CONNECT"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414, "request target over"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 6000 + b"\r\n\r\n", 431, "headers over"),
    ],
)
def test_refusals_name_what_was_wrong(wire: bytes, status: int, reason: str) -> None:
    conn, events = core()
    conn.receive(wire, 0.0)
    assert conn.state == CLOSED
    ((got_status, got_reason),) = events.refused
    assert got_status == status and reason in got_reason


def test_a_refusal_after_the_call_began_waits_for_its_reply() -> None:
    conn, events = core()
    request = conn.receive(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", 0.0
    )
    assert request is not None
    conn.receive(b"zz\r\n", 1.0)  # not a chunk size
    assert events.refused == []  # the active call answers, then the connection closes
    assert conn.must_close and conn.refusal is not None and conn.refusal[0] == 400
    assert request.body.error is not None


def test_a_framing_trailer_refuses_the_request_its_call_answers() -> None:
    conn, events = core()
    request = conn.receive(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nTrailer: x-t\r\n\r\n",
        0.0,
    )
    assert request is not None and events.refused == []
    assert conn.refusal == (400, "a request trailer may not be 'trailer'")
    assert conn.must_close and conn.state == CLOSED


def test_an_upgrade_is_answered_as_http1_then_the_connection_closes() -> None:
    conn, events = core()
    request = conn.receive(
        b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", 0.0
    )
    assert request is not None and request.body.complete and events.refused == []
    assert conn.must_close and conn.state == CLOSED


def test_trailers_are_a_block_of_their_own() -> None:
    conn, _ = core()
    request = conn.receive(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"1\r\nz\r\n0\r\nX-T: 2\r\n\r\n",
        0.0,
    )
    assert request is not None
    assert request.headers == [(b"x-a", b"1")]
    assert request.body.trailers == [(b"x-t", b"2")]


def test_hop_by_hop_fields_and_those_connection_names_are_set_aside() -> None:
    conn, _ = core()
    request = conn.receive(
        b"GET http://app:8080/p?q HTTP/1.1\r\nHost: x\r\nConnection: x-drop\r\n"
        b"X-Drop: 1\r\nTE: gzip\r\nKeep-Alive: 5\r\nX-Keep: 2\r\n\r\n",
        0.0,
    )
    assert request is not None
    assert request.headers == [(b"x-keep", b"2")]
    assert (request.target, request.authority, request.absolute) == (b"/p?q", b"app:8080", True)


def test_a_lost_connection_fails_what_is_still_arriving() -> None:
    conn, _ = core()
    request = conn.receive(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n", 0.0)
    assert request is not None
    conn.lost(ConnectionResetError("gone"))
    assert isinstance(request.body.error, ConnectionResetError) and conn.state == CLOSED
