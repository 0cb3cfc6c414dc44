"""The protocol-neutral call: a request or response head plus a streamed body.

Listeners turn wire bytes into these objects and upstream connections turn them
back into bytes, so the proxy core never sees HTTP/1.1 or HTTP/2 framing.
Header names are lowercase bytes; hop-by-hop headers are already removed. The field
types and helpers live in sidecar.proto.fields (pure) and are re-exported here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from sidecar.proto.fields import (
    FIELD_NAME as FIELD_NAME,
)
from sidecar.proto.fields import (
    HOP_BY_HOP as HOP_BY_HOP,
)
from sidecar.proto.fields import (
    LENGTHS as LENGTHS,
)
from sidecar.proto.fields import (
    Headers as Headers,
)
from sidecar.proto.fields import (
    content_length as content_length,
)
from sidecar.proto.fields import (
    unsafe_header as unsafe_header,
)

# Bodies up to this size stay replayable once read, so a call the peer refused
# (REFUSED_STREAM, GOAWAY, connect failure) can be sent again (Linkerd's bound).
REPLAY_LIMIT = 64 * 1024


class BodyError(Exception):
    """The body's producer failed (peer reset, connection lost)."""


class Body:
    """A body streamed between a producer (a connection) and one consumer.

    Backpressure: every chunk carries its flow-controlled size; when the consumer
    reads it, `on_consumed(size)` runs, which is where an HTTP/2 connection
    returns window to its peer and an HTTP/1.1 connection resumes reading.
    """

    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_replay",
        "_replay_limit",
        "_replay_size",
        "_waiter",
        "buffered",
        "buffered_whole",
        "complete",
        "on_cancel",
        "on_consumed",
        "received",
        "trailers",
    )

    def __init__(self, replayable: bool = True) -> None:
        """`replayable`: keep what is read (up to REPLAY_LIMIT) for rewind(), as a request
        body must be for a resend; a response body is never resent."""
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        # True when the whole body is already here (it can be read without waiting): a
        # slot, not a property, as it is read several times on every call.
        self.complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._replay: list[bytes] | None = [] if replayable else None
        self._replay_size = 0
        self._replay_limit = REPLAY_LIMIT
        # The whole body when a filter buffered it (fixed_body): always replayable.
        self.buffered_whole: bytes | None = None
        self.buffered = 0
        self.received = 0
        self.trailers: Headers | None = None
        self.on_consumed: Callable[[int], None] | None = None
        self.on_cancel: Callable[[], None] | None = None

    # -- producer side --
    def feed(self, data: bytes, flow_size: int = -1) -> bool:
        """Queue a chunk; False when the body is closed and the chunk was dropped."""
        if self._eof:
            return False
        size = len(data) if flow_size < 0 else flow_size
        if not data:
            # An empty (or padding-only) DATA frame is not the end of the body: b"" from
            # read() means end, so never queue one; just give its window back.
            if size and self.on_consumed is not None:
                self.on_consumed(size)
            return True
        self._chunks.append((data, size))
        self.buffered += size
        self.received += len(data)
        if self._waiter is not None:
            self._wake()
        return True

    def finish(self, trailers: Headers | None = None) -> None:
        if trailers:
            self.trailers = trailers
        self._eof = True
        self.complete = self._error is None
        if self._waiter is not None:
            self._wake()

    def fail(self, error: BaseException) -> None:
        if self._eof:
            return
        self._error = error
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- consumer side --
    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end. Raises BodyError if the producer failed."""
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise BodyError(str(self._error)) from self._error
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data, size = self._chunks.popleft()
        self.buffered -= size
        if self._replay is not None:
            self._replay_size += len(data)
            if self._replay_size <= self._replay_limit:
                self._replay.append(data)
            else:
                self._replay = None
        if self.on_consumed is not None and size:
            self.on_consumed(size)
        return data

    def read_nowait(self) -> bytes | None:
        """All the chunks buffered now, joined, or None if there are none."""
        chunks = self._chunks
        if not chunks:
            return None
        if len(chunks) == 1:
            data, total = chunks.popleft()
        else:
            parts = []
            total = 0
            for chunk, size in chunks:
                parts.append(chunk)
                total += size
            chunks.clear()
            data = b"".join(parts)
        self.buffered -= total
        replay = self._replay
        if replay is not None:
            self._replay_size += len(data)
            if self._replay_size <= self._replay_limit:
                replay.append(data)
            else:
                self._replay = None
        if self.on_consumed is not None and total:
            self.on_consumed(total)
        return data

    def rewind(self) -> bool:
        """Put every chunk read so far back in front, for a resend. False if too large to keep."""
        if self._replay is None:
            return False
        for data in reversed(self._replay):
            self._chunks.appendleft((data, 0))
        self._replay = []
        self._replay_size = 0
        return True

    def discard(self) -> None:
        """Nobody will read the rest: drop what is buffered and whatever still arrives."""
        if self.on_consumed is not None and self.buffered:
            self.on_consumed(self.buffered)
        self._chunks.clear()
        self.buffered = 0
        self._replay = None
        self.on_consumed = None
        self._eof = True
        self.complete = self._error is None

    def cancel(self) -> None:
        """The consumer gives up: the producer should stop (reset the stream, close)."""
        if self.on_consumed is not None and self.buffered:
            self.on_consumed(self.buffered)  # unread data still holds flow-control window
        self._chunks.clear()
        self.buffered = 0
        self._replay = None
        callback = self.on_cancel
        self.on_cancel = None
        self.on_consumed = None
        if callback is not None:
            callback()


def fixed_body(data: bytes = b"", trailers: Headers | None = None) -> Body:
    """A body that is all here already; it can be re-read whole for a resend, whatever its size."""
    body = Body()
    body.buffered_whole = data
    body._replay_limit = len(data)
    if data:
        body.feed(data, 0)
    body.finish(trailers)
    return body


class Request:
    __slots__ = (
        "absolute_form",
        "authority",
        "body",
        "headers",
        "method",
        "path",
        "peer",
        "protocol",
        "scheme",
        "start",
    )

    def __init__(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: Headers,
        body: Body,
        *,
        scheme: bytes = b"http",
        protocol: str = "http1",
        peer: str = "",
        start: float = 0.0,
        absolute_form: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.body = body
        self.scheme = scheme
        self.protocol = protocol
        self.peer = peer
        self.start = start
        self.absolute_form = absolute_form

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def is_grpc(self) -> bool:
        ctype = self.header(b"content-type")
        return ctype is not None and ctype.startswith(b"application/grpc")


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers, body: Body) -> None:
        self.status = status
        self.headers = headers
        self.body = body
