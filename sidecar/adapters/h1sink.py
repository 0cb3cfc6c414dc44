"""Writing one response on an HTTP/1.1 server connection (adapters/h1server.py), and,
for a call run on callbacks, how it ends (`done`, `crashed`) or goes on in a task
(`spawn`). The head is proto/h1write's; the body goes whole with it, chunked, under the
response's own content-length, or (to an HTTP/1.0 client) until the connection closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sidecar.errors import error_body
from sidecar.messages import Headers, Request, Response
from sidecar.proto.h1head import bad_field, last_chunk
from sidecar.proto.h1write import CHUNKED, encode_response_head, status_line

if TYPE_CHECKING:
    from sidecar.adapters.h1server import H1ServerProtocol

_INVALID_BODY = b'{"error":"the response had an invalid header","status":500}'
_INVALID_RESPONSE = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_INVALID_BODY), _INVALID_BODY)
)


def rejection(status: int, reason: str) -> bytes:
    """The whole reply to a request refused before any call: JSON, then the close."""
    body, content_type = error_body(status, reason, spaced=True)
    return (
        status_line(status) + b"content-type: %s\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (content_type, len(body)) + body
    )


class H1Sink:
    """Writes one response on an HTTP/1.1 connection; for a call run on callbacks, also
    how it ends (`done`, `crashed`) or goes on in a task (`spawn`)."""

    __slots__ = ("conn", "keep_alive", "request")

    def __init__(self, conn: H1ServerProtocol, request: Request, keep_alive: bool) -> None:
        self.conn = conn
        self.request = request
        self.keep_alive = keep_alive

    def _head(
        self, response: Response, no_body: bool, data: bytes | None
    ) -> tuple[bytes, bool, int]:
        """The response head, whether the body goes chunked and, for a body streamed
        under the response's own content-length, that length (else -1); `data` is the
        whole body when it is all here. Raises Unwritable (see proto/h1write)."""
        head, left, self.keep_alive = encode_response_head(
            response.status,
            response.headers,
            data,
            not no_body and data is None,
            self.keep_alive and not self.conn.ctx.draining,
            self.request.protocol == "http1.0",
        )
        return head, left == CHUNKED, left if left >= 0 else -1

    def _refuse(self, transport: asyncio.Transport, response: Response, why: ValueError) -> int:
        response.body.cancel()
        self.keep_alive = False
        bad = bad_field(response.headers)
        self.conn.ctx.log.error(
            "refused to write a response: %s%s",
            why,
            ""
            if bad is None
            else f" ({bad.decode('latin-1')[:64]!r} holds CR, LF, NUL, "
            "a control byte or is not a token)",
        )
        transport.write(_INVALID_RESPONSE)
        return 0

    def send_now(self, response: Response) -> int | None:
        """Write the whole response if its body is all here (returns the body bytes
        written); None, having written nothing, when the body must be streamed."""
        conn = self.conn
        transport = conn.transport
        if transport is None or conn.closed:
            raise ConnectionResetError("client closed the connection")
        refusal = conn.core.refusal
        if refusal is not None:
            # The request turned out malformed after its call began: say so, and close.
            response.body.cancel()
            self.keep_alive = False
            transport.write(rejection(*refusal))
            return 0
        status = response.status
        body = response.body
        no_body = status < 200 or status == 204 or status == 304 or self.request.method == b"HEAD"
        if no_body:
            data = None
        elif body.complete:
            data = body.read_nowait() or b""
        else:
            return None
        try:
            head, _, self.keep_alive = encode_response_head(
                status,
                response.headers,
                data,
                False,
                self.keep_alive and not conn.ctx.draining,
                self.request.protocol == "http1.0",
            )
        except ValueError as why:
            return self._refuse(transport, response, why)
        if data is None:
            body.cancel()
            transport.write(head)
            return 0
        transport.write(head + data if data else head)
        return len(data)

    async def send(self, response: Response) -> int:
        sent = self.send_now(response)
        if sent is not None:
            return sent
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        body = response.body
        try:
            head, chunked, length = self._head(response, False, None)
        except ValueError as why:
            return self._refuse(transport, response, why)
        sent = 0
        transport.write(head)
        while True:
            chunk = await body.read()
            if not chunk:
                break
            sent += len(chunk)
            if chunked:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif length >= 0 and sent > length:
                # More than its content-length: the rest would read as another response.
                conn.ctx.log.error("response body over its content-length: connection closed")
                body.cancel()
                transport.close()
                return sent - len(chunk)
            else:
                transport.write(chunk)
            if conn.write_paused:
                await conn.drain()
        if chunked:
            trailers = body.trailers
            transport.write(self._last_chunk(trailers) if trailers else b"0\r\n\r\n")
        elif length >= 0 and sent != length:
            conn.ctx.log.error("response body short of its content-length: connection closed")
            transport.close()
        return sent

    def _last_chunk(self, trailers: Headers) -> bytes:
        """The last chunk and the trailers, checked as a head's fields are; trailers that
        would not read back as these fields are dropped (and logged), never written."""
        block = last_chunk(trailers)
        if block is not None:
            return block
        bad = bad_field(trailers)
        self.conn.ctx.log.error("dropped response trailers: %r cannot be written as HTTP/1.1", bad)
        return b"0\r\n\r\n"

    # -- a call run on callbacks --
    def done(self) -> None:
        """The call ended: the connection takes the next request."""
        self.conn.call_done(self.request, self.keep_alive)

    def crashed(self) -> None:
        """The call's code raised (logged here): close the connection, as a task would."""
        conn = self.conn
        conn.ctx.log.exception("unhandled error in %s handler", conn.ctx.name)
        if conn.transport is not None:
            conn.transport.close()
        self.done()

    def spawn(self, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Go on in a task (streaming a body, waiting for a connection): `work` runs as a
        handler's coroutine would, and its end ends the call."""
        conn = self.conn
        return conn.loop.create_task(conn.run(self.request, self, work))
