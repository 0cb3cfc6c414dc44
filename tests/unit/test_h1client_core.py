"""The HTTP/1.1 client core (sidecar.proto.h1client), driven with bytes only: no event
loop, no transport. What the connection would do is recorded by `Events`."""

from __future__ import annotations

from sidecar.proto.fields import Headers
from sidecar.proto.h1client import READ_HIGH_WATER, ClientCore


class FakeBody:
    def __init__(self) -> None:
        self.buffered = 0
        self.data = b""
        self.trailers: Headers | None = None
        self.finished = False

    def feed(self, data: bytes, /) -> object:
        self.data += data
        self.buffered += len(data)
        return None

    def finish(self, trailers: Headers | None = None) -> None:
        self.finished = True
        self.trailers = trailers

    def fail(self, error: BaseException) -> None:
        raise AssertionError(error)


class Events:
    def __init__(self) -> None:
        self.heads: list[tuple[int, Headers, bool]] = []
        self.bodies: list[FakeBody] = []
        self.completed: list[bool] = []
        self.pauses = 0

    def response_received(self, status: int, headers: Headers, no_body: bool) -> FakeBody:
        self.heads.append((status, headers, no_body))
        body = FakeBody()
        self.bodies.append(body)
        return body

    def response_complete(self, keep: bool) -> None:
        self.completed.append(keep)

    def pause_reading(self) -> None:
        self.pauses += 1


def core(limit: int = 1024) -> tuple[ClientCore, Events]:
    events = Events()
    conn = ClientCore(events, limit)
    conn.request_sent = True
    return conn, events


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nhi"


def test_a_response_is_a_head_a_body_and_its_end() -> None:
    conn, events = core()
    assert conn.receive(OK) is None
    assert events.heads == [(200, [(b"content-length", b"2"), (b"x-a", b"1")], False)]
    assert events.bodies[0].data == b"hi" and events.bodies[0].finished
    assert events.completed == [True] and conn.got_bytes and conn.body is None


def test_kept_only_once_the_whole_request_is_sent() -> None:
    conn, events = core()
    conn.request_sent = False  # the app answered before the request body was all sent
    conn.receive(OK)
    assert events.completed == [False]


def test_informational_responses_are_skipped() -> None:
    conn, events = core()
    conn.receive(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert [status for status, _, _ in events.heads] == [200]


def test_a_head_response_has_no_body_whatever_it_says() -> None:
    conn, events = core()
    conn.head_request = True
    conn.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert events.heads[0][2] is True and conn.body is None


def test_trailers_end_the_body_as_a_block_of_their_own() -> None:
    conn, events = core()
    conn.receive(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-T: 2\r\nTrailer: x\r\n\r\n"
    )
    assert events.heads[0][1] == [(b"x-a", b"1")]
    assert events.bodies[0].trailers == [(b"x-t", b"2")]


def test_refusals_say_why() -> None:
    conn, _ = core(limit=64)
    assert conn.receive(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 100) == (
        "response headers over 64 bytes (limits.max_header_bytes)"
    )
    conn, _ = core()
    reason = conn.receive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert reason == "transfer coding 'gzip' is not implemented"
    conn, _ = core()
    reason = conn.receive(b"HTTP/1.1 2x0 OK\r\n\r\n")
    assert reason is not None and reason.startswith("malformed")


def test_reading_pauses_over_the_high_water_mark_until_the_body_is_read() -> None:
    conn, events = core()
    conn.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n")
    conn.receive(b"x" * (READ_HIGH_WATER + 1))
    assert conn.paused and events.pauses == 1 and not conn.may_resume()
    events.bodies[0].buffered = 0  # the caller read it
    assert conn.may_resume()
