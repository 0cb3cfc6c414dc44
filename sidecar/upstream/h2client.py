"""One multiplexed HTTP/2 (h2c) connection to a peer.

`request()` opens a stream, sends the head and (in the background when it is
still arriving) the body, and returns once the response head is here; the
response body streams into a Body whose reads return flow-control window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from ssl import SSLContext
from typing import cast

from sidecar.adapters.h2common import (
    CONNECTION_WINDOW,
    EventHandler,
    H2Base,
    StreamGone,
    event_table,
)
from sidecar.clock import Timer, Timers
from sidecar.errors import StreamRefused, UpstreamReset
from sidecar.messages import Body, BodyError, Headers, Request, Response
from sidecar.proto import h2engine as h2
from sidecar.proto.h2engine import ErrorCodes, SettingCodes

log = logging.getLogger("sidecar.upstream")

_CLIENT_SETTINGS: dict[int, int] = {
    SettingCodes.ENABLE_PUSH: 0,
    SettingCodes.INITIAL_WINDOW_SIZE: 256 * 1024,
}


class _ClientStream:
    __slots__ = ("body", "response", "sender")

    def __init__(self, response: asyncio.Future[Response]) -> None:
        self.response = response
        self.body: Body | None = None
        self.sender: asyncio.Task[None] | None = None


class H2ClientConnection(H2Base):
    def __init__(
        self,
        on_change: Callable[[H2ClientConnection], None] | None = None,
        keepalive: tuple[float, float] = (0.0, 0.0),
        timers: Timers | None = None,
    ) -> None:
        super().__init__(h2.H2Connection(client_side=True, settings=_CLIENT_SETTINGS))
        # The keepalive's clock and timer (and the pool's idle clock): the loop's unless given.
        self.timers: Timers = timers if timers is not None else self.loop
        self.streams: dict[int, _ClientStream] = {}
        self.reserved = 0  # streams promised to callers, not yet opened
        self.uses = 0  # streams opened over the connection's life
        self.goaway = False
        self.last_active = 0.0
        self.on_change = on_change  # pool hook: a slot freed or the connection died
        self._connected: asyncio.Future[None] = self.loop.create_future()
        self.keepalive_interval, self.keepalive_timeout = keepalive
        self.last_received = 0.0
        self.ping_timeouts = 0
        self._ping_timer: Timer | None = None
        self._ping_pending: bytes | None = None

    # -- capacity --
    @property
    def max_streams(self) -> int:
        limit = self.h2.remote_max_concurrent_streams
        # Until the peer's SETTINGS arrive the limit is "unlimited"; assume RFC 9113's
        # recommended minimum of 100 rather than flood a peer with a lower one.
        return limit if limit < 2**31 else 100

    @property
    def active(self) -> int:
        return len(self.streams) + self.reserved

    @property
    def usable(self) -> bool:
        return not self.closed and not self.goaway

    def has_capacity(self) -> bool:
        return self.usable and self.active < self.max_streams

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self.last_active = self.last_received = self.timers.time()
        if self.keepalive_interval > 0:
            self._ping_timer = self.timers.call_later(self.keepalive_interval, self._keepalive)
        if not self._connected.done():
            self._connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._fail(stream, UpstreamReset("upstream connection lost"))
        self._wake_all()
        if self.on_change is not None:
            self.on_change(self)

    def data_received(self, data: bytes) -> None:
        self.last_received = self.timers.time()
        try:
            events = self.h2.receive_data(data)
        except h2.ProtocolError:
            self.flush()
            self.close()
            return
        on_event = _ON_EVENT  # after the class
        for event in events:
            on_event[type(event)](self, event)
        self.flush()

    # -- keepalive --
    def _keepalive(self) -> None:
        """Every interval: a connection that heard nothing gets a PING; a PING unanswered
        within the timeout means a dead peer (a half-open TCP connection, a frozen host)."""
        self._ping_timer = None
        if self.closed:
            return
        now = self.timers.time()
        if self._ping_pending is not None:
            self.ping_timeouts += 1
            log.warning("HTTP/2 peer did not answer PING within %ss: dropping the connection",
                        self.keepalive_timeout)  # fmt: skip
            self.abort()
            return
        quiet = now - self.last_received
        # A timer may fire a hair early (the loop's clock resolution, float rounding):
        # within 1 ms counts as due, or it would re-arm itself for no time at all.
        if quiet + 0.001 >= self.keepalive_interval:
            self._ping_pending = now.hex().encode()[-8:].rjust(8, b"0")
            try:
                self.h2.ping(self._ping_pending)
            except h2.ProtocolError:
                return
            self.flush()
            self._ping_timer = self.timers.call_later(self.keepalive_timeout, self._keepalive)
        else:
            self._ping_timer = self.timers.call_later(
                self.keepalive_interval - quiet, self._keepalive
            )

    def abort(self) -> None:
        self.goaway = True
        if self.transport is not None:
            self.transport.abort()

    # -- events --
    def _response(self, event: h2.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.response.done():
            return
        status = 0
        headers: Headers = []
        for name, value in event.headers:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                headers.append((name, value))
        stream_id = event.stream_id
        body = Body(replayable=False)
        body.on_consumed = lambda size: self.ack(stream_id, size)
        body.on_cancel = lambda: self._cancel(stream_id)
        stream.body = body
        if event.stream_ended:
            body.finish()
        stream.response.set_result(Response(status, headers, body))

    def _data(self, event: h2.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        body = stream.body if stream is not None else None
        accepted = body is not None and body.feed(event.data or b"", size)
        if not accepted and size:
            self.ack(event.stream_id, size)

    def _stream_ended(self, event: h2.StreamEnded) -> None:
        self._ended(event.stream_id, None)

    def _trailers(self, event: h2.TrailersReceived) -> None:
        self._ended(event.stream_id, list(event.headers))

    def _window_updated(self, event: h2.WindowUpdated) -> None:
        self.window_opened(event.stream_id)

    def _settings_changed(self, event: h2.RemoteSettingsChanged) -> None:
        self.window_opened(0)
        if self.on_change is not None:
            self.on_change(self)

    def _ping_answered(self, event: h2.PingAckReceived) -> None:
        self._ping_pending = None

    def _ended(self, stream_id: int, trailers: Headers | None) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.body is not None:
            stream.body.finish(trailers)
        elif trailers is not None and not stream.response.done():
            # Trailers without a response head: the peer broke off the response.
            stream.response.set_exception(UpstreamReset("response ended before its headers"))
        self._release(stream_id)

    def _reset(self, event: h2.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        if event.error_code == ErrorCodes.REFUSED_STREAM:
            error: Exception = StreamRefused("upstream refused the stream")
        else:
            error = UpstreamReset(f"upstream reset the stream ({event.error_code!s})")
        # A complete response was already released by _ended, so a stream still here was
        # cut short, whatever the code (RST_STREAM(NO_ERROR) after END_STREAM never gets here).
        self._fail(stream, error)
        self.stream_closed(event.stream_id)
        self._release(event.stream_id)

    def _goaway(self, event: h2.ConnectionTerminated) -> None:
        self.goaway = True
        last = event.last_stream_id
        for stream_id in [sid for sid in self.streams if sid > last]:
            stream = self.streams[stream_id]
            self._fail(stream, StreamRefused("stream above the peer's GOAWAY last-stream-id"))
            self._release(stream_id)
        if self.on_change is not None:
            self.on_change(self)
        if not self.streams:
            self.close()

    def _fail(self, stream: _ClientStream, error: Exception) -> None:
        if not stream.response.done():
            stream.response.set_exception(error)
        elif stream.body is not None:
            stream.body.fail(error)
        if stream.sender is not None and not stream.sender.done():
            stream.sender.cancel()

    def _release(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is None:
            return
        self.last_active = self.timers.time()
        if self.goaway and not self.streams:
            self.close()
        if self.on_change is not None:
            self.on_change(self)

    def _cancel(self, stream_id: int, error: Exception | None = None) -> None:
        """The caller went away (or its request body failed): reset the upstream stream.
        With `error`, a call still waiting for its response head fails with it."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if error is not None and not stream.response.done():
            stream.response.set_exception(error)
        if stream.sender is not None and not stream.sender.done():
            stream.sender.cancel()
        self.reset_stream(stream_id, ErrorCodes.CANCEL)
        self.stream_closed(stream_id)
        self._release(stream_id)

    # -- sending --
    async def request(self, request: Request, authority: bytes, path: bytes) -> Response:
        """Send `request` on a new stream; the caller must hold a reserved slot."""
        self.reserved -= 1
        if not self.usable:
            raise StreamRefused("upstream connection is closing")
        headers: Headers = [
            (b":method", request.method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path),
        ]
        headers += request.headers
        body = request.body
        h2c = self.h2
        try:
            stream_id = h2c.get_next_available_stream_id()
        except h2.NoAvailableStreamIDError:
            self.goaway = True
            raise StreamRefused("stream ids exhausted on this connection") from None
        waiter: asyncio.Future[Response] = self.loop.create_future()
        stream = _ClientStream(waiter)
        self.uses += 1
        self.streams[stream_id] = stream
        self.last_active = self.timers.time()
        try:
            if body.complete and not body.trailers:
                data = body.read_nowait()
                h2c.send_headers(stream_id, headers, end_stream=not data)
                self.flush()
                if data and not self.send_whole(stream_id, data):
                    await self.send_data(stream_id, data, end_stream=True)
            else:
                h2c.send_headers(stream_id, headers)
                self.flush()
                stream.sender = self.loop.create_task(self._send_body(stream_id, body))
        except (StreamGone, h2.ProtocolError, h2.StreamClosedError) as exc:
            self._release(stream_id)
            if not waiter.done():
                raise UpstreamReset(f"upstream stream failed while sending: {exc}") from None
        try:
            return await waiter
        except asyncio.CancelledError:
            self._cancel(stream_id)
            raise

    async def _send_body(self, stream_id: int, body: Body) -> None:
        try:
            while True:
                chunk = await body.read()
                if not chunk:
                    break
                await self.send_data(stream_id, chunk)
            self.end_stream(stream_id, body.trailers)
        except (StreamGone, asyncio.CancelledError):
            return
        except BodyError as exc:
            # The downstream caller went away mid-body: the upstream call is void.
            self._cancel(stream_id, UpstreamReset(f"the request body failed: {exc}"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            try:
                self.h2.close_connection()
                self.flush_now()
            except h2.ProtocolError:
                pass
            self.transport.close()
        self.closed = True


# What H2ClientConnection.data_received() does with each engine event (the class's
# own functions, looked up once: an override in a subclass is not seen).
_ON_EVENT: dict[type, EventHandler[H2ClientConnection]] = event_table(
    {
        h2.ResponseReceived: H2ClientConnection._response,
        h2.DataReceived: H2ClientConnection._data,
        h2.StreamEnded: H2ClientConnection._stream_ended,
        h2.TrailersReceived: H2ClientConnection._trailers,
        h2.WindowUpdated: H2ClientConnection._window_updated,
        h2.StreamReset: H2ClientConnection._reset,
        h2.RemoteSettingsChanged: H2ClientConnection._settings_changed,
        h2.ConnectionTerminated: H2ClientConnection._goaway,
        h2.PingAckReceived: H2ClientConnection._ping_answered,
    }
)


async def connect_h2(
    host: str,
    port: int,
    timeout: float,
    on_change: Callable[[H2ClientConnection], None] | None = None,
    keepalive: tuple[float, float] = (0.0, 0.0),
    timers: Timers | None = None,
    ssl: SSLContext | None = None,
) -> H2ClientConnection:
    """Connect (and, with `ssl`, handshake) within `timeout`."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: H2ClientConnection(on_change, keepalive, timers), host, port, ssl=ssl
        ),
        timeout,
    )
    return proto
