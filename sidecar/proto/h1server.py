"""The HTTP/1.1 server side of one connection, Sans-IO: bytes and `now` in; requests,
refusals and deadlines out. httptools (llhttp) parses; this holds what the parse means.

`ServerCore.receive(data, now)` parses what the client sent and returns the request
whose head arrived in it, if one may start (others queue behind the call in progress:
pipelining). What else happens goes to the `ServerEvents` the adapter implements: a new
request head (the adapter builds the message and its body, which the core feeds), a
refusal to answer and close with, reading to pause. Deadlines are values the core keeps
(`expired(now)` says which passed, or when to look again); the adapter arms one timer
per connection from them, and hands in `now` from the injected clock (`sidecar.clock`).

What the connection is reading, one state at a time (h11's states for the peer):

    IDLE  --first byte of a head-->  HEAD  --head parsed-->  BODY  --body whole-->  IDLE
      any --refused, upgraded, timed out-->  CLOSED (nothing more is parsed)

and the call side: `active` (a call in progress, whose reply comes first), `queue` (the
pipelined requests behind it), `must_close` (close once the active call is through).
The timer's deadline follows from these: HEAD waits for the head (header_read_timeout,
counted from the head's first byte), BODY for the client's next byte (body_read_timeout;
not while reading is paused, which is our wait), IDLE with no call for the next request
(idle_timeout).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

import httptools

from sidecar.proto.fields import Headers, field_bytes
from sidecar.proto.h1head import FRAMING_FIELDS
from sidecar.proto.h1request import (
    BODY,
    CLOSED,
    HEAD,
    IDLE,
    Limits,
    Refusal,
    RequestFields,
    refuse_trailer,
)

# What a deadline waits for, as limits.<kind>_timeout names it.
HEADER, BODY_BYTES, IDLE_TIME = "header", "body", "idle"

# Buffered request body above which the connection stops reading from the client.
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024


class BodySink(Protocol):
    """A request body as the core feeds it (sidecar.messages.Body)."""

    @property
    def buffered(self) -> int: ...

    def feed(self, data: bytes, /) -> object: ...

    def finish(self, trailers: Headers | None = None) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class Incoming(Protocol):
    @property
    def body(self) -> BodySink: ...


R = TypeVar("R", bound=Incoming)
R_co = TypeVar("R_co", bound=Incoming, covariant=True)


class ServerEvents(Protocol[R_co]):
    def request_received(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        absolute: bool,
        http10: bool,
    ) -> R_co:
        """A request head: the message the core queues, starts and feeds the body of."""
        ...

    def refuse(self, status: int, reason: str) -> None:
        """Answer `status` (no call is in progress) and close the connection."""
        ...

    def pause_reading(self) -> None: ...


class BodyFailed(Exception):
    """What a body the core fails raises to its reader, unless the adapter names its own."""


class ServerCore(RequestFields, Generic[R]):
    def __init__(
        self,
        events: ServerEvents[R],
        limits: Limits,
        tick: float,
        body_error: type[Exception] = BodyFailed,
    ) -> None:
        self.events = events
        self._body_error = body_error  # what a body's reader gets when the core fails it
        self.parser = httptools.HttpRequestParser(self)
        super().__init__(limits)
        self._header_read_timeout = limits.header_read_timeout
        self._body_read_timeout = limits.body_read_timeout
        self._idle_timeout = limits.idle_timeout
        self.tick = tick
        self._now = 0.0  # of the bytes being parsed
        # Deadlines (the clock's time; 0: none): the head's, and the body's next byte or
        # idle's end (`deadline_kind`), which the state tells apart when the timer fires.
        self.header_deadline = 0.0
        self.deadline = 0.0
        self.deadline_kind = IDLE_TIME
        self.parsing: R | None = None  # the request whose body is arriving (BODY)
        self.active: R | None = None  # the call in progress
        self.queue: deque[tuple[R, bool]] = deque()  # pipelined behind it (keep-alive)
        self._arrived: R | None = None  # its head came in the bytes being parsed
        self.arrived_keep_alive = True
        self.must_close = False
        self.paused = False  # reading paused (the adapter paused the transport)
        # Why the active request's own bytes turned out malformed after its call began:
        # its reply says that, whatever the call made of the broken body.
        self.refusal: tuple[int, str] | None = None

    # -- bytes in --
    def receive(self, data: bytes, now: float) -> R | None:
        """Parse `data`; the request whose head it held, to start, or None."""
        if self.state == CLOSED:
            return None
        self._now = now
        if self.parsing is None:
            self._head_read += len(data)  # a head on its way (or about to be)
        try:
            self.parser.feed_data(data)
        except Refusal as refusal:
            self.refuse(refusal.status, refusal.reason)
        except httptools.HttpParserUpgrade:
            # A request with `Upgrade:` (curl --http2 sends `Upgrade: h2c`): the request
            # itself is answered as plain HTTP/1.1 (the upgrade header is hop-by-hop and
            # dropped); the connection then closes, as bytes after it are not HTTP/1.1.
            self.state = CLOSED
            if self.parsing is not None:
                self.parsing.body.finish()
                self.parsing = None
            self.must_close = True
            if self.active is None:
                self.events.refuse(400, "protocol upgrades are not supported by this listener")
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; our own refusals carry their status.
            cause = exc.__context__
            if isinstance(cause, Refusal):
                self.refuse(cause.status, cause.reason)
            else:
                self.refuse(400, f"malformed HTTP/1.1 request: {exc}")
        if self._head_read > self._head_read_max and self.state != CLOSED:
            self.refuse(431, f"request headers over {self._max_header_bytes} bytes")
        if self.parsing is not None:
            # A body still on its way: the client's next byte is due in body_read_timeout.
            self.deadline = now + self._body_read_timeout
            self.deadline_kind = BODY_BYTES
        request = self._arrived
        if request is not None:
            self._arrived = None
        return request

    def refuse(self, status: int, reason: str) -> None:
        """Refuse the request being read (or the connection): parse nothing more."""
        self.state = CLOSED
        parsing = self.parsing
        if parsing is not None:
            # Its body can never be read whole now: whoever reads it gets an error.
            self.parsing = None
            parsing.body.fail(self._body_error(f"malformed request body: {reason}"))
            if parsing is self.active:
                self.refusal = (status, reason)
        if self.active is not None:
            # The call in progress ends (with a reply if its request was whole; with an
            # error if this broke its body); then the connection closes.
            self.must_close = True
            return
        self.must_close = True
        self.events.refuse(status, reason)

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self.state = HEAD
        self._url = b""
        self._host = None
        self._connection_tokens = None
        self._hop_bytes = 0
        self._trailer_bytes = 0
        self.header_deadline = self._now + self._header_read_timeout

    def on_headers_complete(self) -> None:
        self.header_deadline = 0.0
        if self._head_read > self._max_header_bytes and (
            self._hop_bytes + field_bytes(self._headers) > self._max_header_bytes
        ):
            raise Refusal(431, f"request headers over {self._max_header_bytes} bytes")
        self._head_read = 0
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise Refusal(501, "CONNECT is not supported by this listener")
        http10 = parser.get_http_version() == "1.0"
        if self._host is None and not http10:
            raise Refusal(400, "an HTTP/1.1 request must have a Host header")
        url = self._url
        headers = self._headers
        if self._connection_tokens:
            drop = set(self._connection_tokens)
            headers = [(n, v) for n, v in headers if n not in drop]
        if url[:1] == b"/" or url == b"*":
            request = self.events.request_received(
                method, url, self._host or b"", headers, False, http10
            )
        else:
            path, authority = self._absolute(url)
            request = self.events.request_received(method, path, authority, headers, True, http10)
        self._headers = []  # for its trailers, if any
        self.parsing = request
        self.state = BODY
        keep_alive = bool(parser.should_keep_alive())
        if self.active is None:
            self.active = request
            self._arrived = request
            self.arrived_keep_alive = keep_alive
        else:
            self.queue.append((request, keep_alive))
            self.pause()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        request.body.feed(body)
        if request.body.buffered > READ_HIGH_WATER:
            self.pause()

    def on_message_complete(self) -> None:
        trailers = self._headers
        if trailers:
            self._headers = []
            for name, _ in trailers:
                if name in FRAMING_FIELDS:
                    refuse_trailer(name)
        request = self.parsing
        if request is not None:
            request.body.finish(trailers)
            self.parsing = None
        self.state = IDLE

    # -- the call side --
    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.events.pause_reading()

    def call_ended(self, now: float) -> tuple[R, bool] | None:
        """The active call is through and the connection stays: the next queued request
        (and its keep-alive) to start, if any; then `may_resume` says whether to resume
        reading."""
        self.active = None
        nxt = None
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt[0]
        if self.parsing is None:
            # Idle from now (the timer tells a pipelined request's call from idling).
            self.deadline = now + self._idle_timeout
            self.deadline_kind = IDLE_TIME
        return nxt

    def may_resume(self) -> bool:
        """Reading is paused and nothing holds it so: the adapter resumes the transport."""
        if not self.paused or self.queue:
            return False
        parsing = self.parsing
        return parsing is None or parsing.body.buffered < READ_LOW_WATER

    def resumed(self, now: float) -> None:
        self.paused = False
        if self.deadline_kind == BODY_BYTES and self.deadline:
            # The wait was ours: the client's time for the next byte starts now.
            self.deadline = now + self._body_read_timeout

    def idle(self) -> bool:
        """No call in progress and no request arriving (a draining listener closes it)."""
        return self.active is None and self.parsing is None

    # -- time --
    def first_byte_at(self, when: float) -> float:
        """The connection's first byte came in at `when`, before this protocol was chosen:
        the first head's deadline counts from then. The deadline if it moved earlier (the
        adapter re-arms its timer), else 0."""
        deadline = when + self._header_read_timeout
        if 0.0 < deadline < self.header_deadline:
            self.header_deadline = deadline
            return deadline
        return 0.0

    def expired(self, now: float) -> tuple[str | None, float]:
        """When the timer fires: the deadline that passed (HEADER, BODY_BYTES, IDLE_TIME),
        or None and when to look again."""
        deadline, kind = self.header_deadline, HEADER
        if not deadline:
            deadline, kind = self.deadline, self.deadline_kind
            if kind == BODY_BYTES:
                if self.parsing is None:
                    deadline = 0.0  # the body is whole: a call's turn, not the client's
                elif self.paused:
                    deadline = self.deadline = now + self._body_read_timeout  # ours
            elif self.active is not None or self.parsing is not None or self.queue:
                deadline = 0.0  # a call's turn: not idle
        if not deadline or now < deadline:
            wake = now + self.tick
            return None, (min(deadline, wake) if deadline else wake)
        self.header_deadline = self.deadline = 0.0
        return kind, 0.0

    def timed_out(self, kind: str) -> None:
        """`kind` expired and the connection closes: the head is answered 408; a body's
        reader (if any) sees why it ends."""
        if kind == HEADER:
            self.refuse(408, "request headers not received in time")
            return
        parsing = self.parsing
        if parsing is not None:
            self.parsing = None
            parsing.body.fail(self._body_error("request body not received in time"))
        self.state = CLOSED

    def lost(self, error: BaseException) -> None:
        """The connection closed: bodies still arriving or queued fail with `error`."""
        self.state = CLOSED
        if self.parsing is not None:
            self.parsing.body.fail(error)
        for request, _ in self.queue:
            request.body.fail(error)
        self.queue.clear()
