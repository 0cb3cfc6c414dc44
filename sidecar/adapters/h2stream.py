"""One stream of an h2c server connection (sidecar/adapters/h2server.py): what the
connection keeps for it, and its reply side, which writes a Response's head, body and
trailers onto the stream the request came on, within flow control (h2common.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sidecar.adapters.h2common import StreamGone
from sidecar.messages import HOP_BY_HOP, Headers, Request, Response
from sidecar.proto import h2engine as h2

if TYPE_CHECKING:
    from sidecar.adapters.h2server import H2ServerProtocol

_STATUS_BYTES = {code: str(code).encode() for code in range(100, 600)}


class ServerStream:
    """What H2ServerProtocol keeps for an open stream."""

    __slots__ = ("progress", "request", "task")

    def __init__(self, request: Request, progress: float) -> None:
        self.request = request
        self.task: asyncio.Task[None] | None = None
        # Loop time the request body last moved; 0 once it is whole.
        self.progress = progress


class H2Sink:
    """The handler's `ResponseSink` for one stream of an H2ServerProtocol."""

    __slots__ = ("conn", "stream_id")

    def __init__(self, conn: H2ServerProtocol, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id

    async def send(self, response: Response) -> int:
        conn = self.conn
        stream = conn.streams.get(self.stream_id)
        if conn.closed or stream is None:
            raise StreamGone("client went away")
        # Answered: a request body still streaming in (gRPC bidi) is no longer timed.
        stream.progress = 0.0
        headers: Headers = [(b":status", _STATUS_BYTES.get(response.status) or b"500")]
        for name, value in response.headers:
            if name not in HOP_BY_HOP:
                headers.append((name, value))
        body = response.body
        stream_id = self.stream_id
        h2c = conn.h2
        try:
            if body.complete and not body.trailers:
                data = body.read_nowait()
                if not data:
                    h2c.send_headers(stream_id, headers, end_stream=True)
                    conn.flush()
                    return 0
                h2c.send_headers(stream_id, headers)
                if not conn.send_whole(stream_id, data):
                    await conn.send_data(stream_id, data, end_stream=True)
                return len(data)
            h2c.send_headers(stream_id, headers)
        except (h2.StreamClosedError, h2.ProtocolError) as exc:
            raise StreamGone(str(exc)) from None
        conn.flush()
        sent = 0
        while True:
            chunk = await body.read()
            if not chunk:
                break
            sent += len(chunk)
            await conn.send_data(stream_id, chunk)
        conn.end_stream(stream_id, body.trailers)
        return sent
