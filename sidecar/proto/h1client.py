"""The HTTP/1.1 client side of one connection, Sans-IO: response bytes in; the response
head, its body's bytes and its end (with whether the connection may be kept) out, to
the `ClientEvents` the adapter (upstream/h1conn.py) implements. httptools (llhttp)
parses; the fields and their limits are h1response's.

The adapter tells the core what it sent: `head_request` (a HEAD's response has no body,
which httptools cannot be told) and `request_sent` (the whole request is on the wire:
only then may the connection be kept after the response). Reading pauses when the body
the caller has not read yet goes over a high-water mark (`paused`, which the adapter
clears when it resumes).
"""

from __future__ import annotations

from typing import Protocol

import httptools

from sidecar.proto.fields import Headers, field_bytes
from sidecar.proto.h1response import Refused, ResponseFields

READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024


class ResponseBody(Protocol):
    """A response body as the core feeds it (sidecar.messages.Body)."""

    @property
    def buffered(self) -> int: ...

    def feed(self, data: bytes, /) -> object: ...

    def finish(self, trailers: Headers | None = None) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class ClientEvents(Protocol):
    def response_received(self, status: int, headers: Headers, no_body: bool) -> ResponseBody:
        """A final response head: the body the core feeds (whole already if `no_body`)."""
        ...

    def response_complete(self, keep: bool) -> None:
        """The response is whole; `keep`: the connection may carry another call."""
        ...

    def pause_reading(self) -> None: ...


class ClientCore(ResponseFields):
    def __init__(self, events: ClientEvents, max_header_bytes: int) -> None:
        super().__init__(max_header_bytes)
        self.events = events
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = False
        self.request_sent = False
        self.got_bytes = False  # of the current call's response
        self.paused = False
        self.body: ResponseBody | None = None  # the response body being read

    def receive(self, data: bytes) -> str | None:
        """Parse `data`; why the response is refused (the connection must close), or None."""
        self.got_bytes = True
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; our own refusals carry the reason.
            cause = exc.__context__
            return str(cause) if isinstance(cause, Refused) else f"malformed: {exc}"
        if self._in_head:
            if self._head_bytes > self._max_header_bytes:
                return self.over("headers")
        elif self._headers:
            return self.count_trailers()  # trailers arriving: over the limit already?
        return None

    # -- httptools callbacks (and on_header: ResponseFields) --
    def on_headers_complete(self) -> None:
        headers = self._headers
        self._headers = []
        drop = self._drop
        self._drop = None
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx: informational, the real response follows
        self._in_head = False
        limit = self._max_header_bytes
        if self._head_bytes > limit and field_bytes(headers) > limit:
            raise Refused(self.over("headers"))
        if drop:
            headers = [(n, v) for n, v in headers if n not in drop]
        no_body = self.head_request or status == 204 or status == 304
        body = self.events.response_received(status, headers, no_body)
        self.body = None if no_body else body

    def on_body(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            body.feed(data)
            if body.buffered > READ_HIGH_WATER and not self.paused:
                self.paused = True
                self.events.pause_reading()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        self._in_head = True
        self._head_bytes = 0
        trailers = self._headers
        if trailers:
            trailers = self.take_trailers(trailers)
        body = self.body
        self.body = None
        if body is not None:
            body.finish(trailers)
        self.events.response_complete(bool(self.parser.should_keep_alive()) and self.request_sent)

    def may_resume(self) -> bool:
        """Reading is paused and the body is read down below the low-water mark."""
        body = self.body
        return self.paused and (body is None or body.buffered < READ_LOW_WATER)
