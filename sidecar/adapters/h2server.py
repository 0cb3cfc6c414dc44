"""HTTP/2 (cleartext, prior knowledge) server side of a listener.

Each stream becomes a Request handed to the listener's handler in its own task;
a client RST_STREAM cancels that task, which resets the upstream stream in turn.

One timer per connection keeps its deadlines (limits.*): the client's SETTINGS after
the preface, a GOAWAY once no stream has been open for idle_timeout, and a reset for a
stream whose request body stops arriving for body_read_timeout. A stream's record and
its reply side are in h2stream.py; the limits on what a client may make us do, h2guard.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from sidecar.adapters.h2common import CONNECTION_WINDOW, EventHandler, H2Base, event_table
from sidecar.adapters.h2guard import (
    CONTROL_BURST,
    CONTROL_PER_SECOND,
    MAX_WRITE_BUFFER,
    RESET_BURST,
    RESETS_PER_SECOND,
    Budget,
)
from sidecar.adapters.h2stream import H2Sink, ServerStream
from sidecar.clock import Timer, Timers
from sidecar.messages import HOP_BY_HOP, Body, BodyError, Headers, Request
from sidecar.proto import h2engine as h2
from sidecar.proto.h2engine import ErrorCodes, SettingCodes

if TYPE_CHECKING:
    from sidecar.serving import ListenerContext

# How long a connection closed for abuse (_calm) still reads and drops what arrives.
LINGER_SECONDS = 1.0
# After a graceful GOAWAY, an idle connection stays this long before it closes.
GOAWAY_GRACE_SECONDS = 0.5


class H2ServerProtocol(H2Base):
    def __init__(self, ctx: ListenerContext) -> None:
        settings = ctx.http2
        super().__init__(
            h2.H2Connection(
                client_side=False,
                settings={
                    SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                    SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
                    SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
                    SettingCodes.MAX_HEADER_LIST_SIZE: ctx.limits.max_header_bytes,
                },
            )
        )
        self.ctx = ctx
        self.peer = ""
        self.streams: dict[int, ServerStream] = {}
        self.last_stream_id = 0
        self.goaway_sent = False
        self._calmed = False
        self._client_left = False  # the client sent GOAWAY: nothing more will come
        self._closing: Timer | None = None
        # Every deadline and rate below keeps time with these: the loop's unless the
        # listener was given a clock (tests move one by hand).
        self.timers: Timers = ctx.timers if ctx.timers is not None else self.loop
        now = self.timers.time()
        self._resets = Budget(RESETS_PER_SECOND, RESET_BURST, now)
        self._control = Budget(CONTROL_PER_SECOND, CONTROL_BURST, now)
        # Set by the listener: the loop time by which the client's SETTINGS must be in.
        self.preface_deadline = 0.0
        self._settings_in = False
        self._idle_since = 0.0  # loop time the last stream closed (or the connection began)
        self._timer: Timer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.ctx.connections.add(self)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        now = self._idle_since = self.timers.time()
        if not self.preface_deadline:
            self.preface_deadline = now + self.ctx.limits.preface_timeout
        self._timer = self.timers.call_at(
            min(self.preface_deadline, now + self.ctx.timer_tick), self._on_timer
        )
        if self.ctx.draining:
            self.close_if_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._closing is not None:
            self._closing.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.connections.discard(self)
        for stream in self.streams.values():
            stream.request.body.fail(ConnectionResetError("client connection lost"))
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
        self.streams.clear()
        self._wake_all()

    def data_received(self, data: bytes) -> None:
        if self._calmed:
            return  # lingering before close: read and dropped
        try:
            events = self.h2.receive_data(data)
        except h2.ProtocolError as exc:
            self.ctx.log.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self.flush_now()
            if self.transport is not None:
                self.transport.close()
            return
        on_event = _ON_EVENT  # after the class
        for event in events:
            if on_event[type(event)](self, event):
                return  # calmed: the connection is closing
        self.flush()
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # A client that sends but never reads (our replies, ACKs) piles up our buffer.
            self._calm("client is not reading")

    def _calm(self, reason: str) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM) and close: the client is abusing the connection.

        The close lingers: what the client still sends is read and dropped for a moment,
        since closing with unread input makes the kernel send RST, and an RST can reach
        the client before the GOAWAY that says why."""
        if self._calmed or self.transport is None:
            return
        self._calmed = True
        self.ctx.log.warning("closing HTTP/2 connection from %s: %s", self.peer, reason)
        self.send_graceful_goaway(self.last_stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
        self.goaway_sent = True
        for stream in self.streams.values():
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        self.timers.call_later(LINGER_SECONDS, transport.close)

    # -- events --
    def _request(self, event: h2.RequestReceived) -> None:
        stream_id = event.stream_id
        method = path = authority = b""
        scheme = b"http"
        headers: Headers = []
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
            elif name in HOP_BY_HOP:
                if name == b"host" and not authority:
                    authority = value
            else:
                headers.append((name, value))
        body = Body()
        body.on_consumed = lambda size: self.ack(stream_id, size)
        if event.stream_ended:
            body.finish()
        request = Request(
            method,
            path,
            authority,
            headers,
            body,
            scheme=scheme,
            protocol="h2c",
            peer=self.peer,
            start=time.monotonic(),
        )
        if stream_id > self.last_stream_id:
            self.last_stream_id = stream_id
        if self.goaway_sent:
            # Arrived after our GOAWAY: refuse, the client may send it elsewhere.
            self.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = ServerStream(request, 0.0 if event.stream_ended else self.timers.time())
        self.streams[stream_id] = stream
        stream.task = self.loop.create_task(self._run(stream_id, stream))

    def _ended(self, event: h2.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.progress = 0.0
            stream.request.body.finish()

    def _trailers(self, event: h2.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.progress = 0.0
            stream.request.body.finish(list(event.headers))

    def _window_updated(self, event: h2.WindowUpdated) -> None:
        self.window_opened(event.stream_id)

    def _stream_reset(self, event: h2.StreamReset) -> bool:
        if not event.remote:
            self.ctx.log.debug("HTTP/2 stream reset for %s: %s", self.peer, event.reason)
        self._reset(event.stream_id)
        if not self._resets.spend(self.timers.time()):
            # CVE-2023-44487 (rapid reset): streams opened and cancelled at once.
            self._calm("too many stream resets")
            return True
        return False

    def _settings_changed(self, event: h2.RemoteSettingsChanged) -> bool:
        self._settings_in = True
        self.window_opened(0)
        return self._control_spent()

    def _ping(self, event: h2.PingReceived) -> bool:
        return self._control_spent()

    def _control_spent(self) -> bool:
        if not self._control.spend(self.timers.time()):
            # Each SETTINGS or PING makes us queue an ACK: a flood is work for free.
            self._calm("too many SETTINGS or PING frames")
            return True
        return False

    def _client_goaway(self, event: h2.ConnectionTerminated) -> None:
        # The client is leaving: no new streams, but the open ones may finish.
        self._client_left = True
        self.goaway_sent = True
        self.close_if_idle()

    def _data(self, event: h2.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if stream is not None and stream.progress:
            stream.progress = self.timers.time()
        accepted = stream is not None and stream.request.body.feed(event.data or b"", size)
        if not accepted and size:
            # Nobody will read it: give the window back at once.
            self.ack(event.stream_id, size)

    def _reset(self, stream_id: int) -> None:
        self.stream_closed(stream_id)
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if not self.streams:
            self._idle_since = self.timers.time()
        body = stream.request.body
        unread = body.buffered
        body.on_consumed = None
        body.fail(ConnectionResetError("client reset the stream"))
        if unread:
            self.ack(stream_id, unread)  # the connection window the unread data held
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    async def _run(self, stream_id: int, stream: ServerStream) -> None:
        ctx = self.ctx
        ctx.in_flight += 1
        try:
            await ctx.handler(stream.request, H2Sink(self, stream_id))
        except asyncio.CancelledError:
            pass
        except BodyError:
            # The upstream failed mid-response: reset so the client sees an incomplete reply.
            self.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
        except Exception:
            ctx.log.exception("unhandled error in %s handler", ctx.name)
            self.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            ctx.in_flight -= 1
            if ctx.in_flight == 0:
                ctx.idle.set()
            if self.streams.pop(stream_id, None) is not None:
                if not self.streams:
                    self._idle_since = self.timers.time()
                body = stream.request.body
                if not body.at_eof:
                    # The reply is done but the client is still sending: stop it.
                    body.discard()
                    self.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            if self.goaway_sent:
                self.close_if_idle()

    # -- timeouts --
    def _on_timer(self) -> None:
        self._timer = None
        transport = self.transport
        if self.closed or transport is None or self._calmed:
            return
        ctx = self.ctx
        limits = ctx.limits
        now = self.timers.time()
        next_at = now + ctx.timer_tick
        if not self._settings_in:
            if now >= self.preface_deadline:
                ctx.timed_out("preface", self.peer)
                transport.close()
                return
            next_at = min(next_at, self.preface_deadline)
        if self.streams:
            body_timeout = limits.body_read_timeout
            for stream_id, stream in tuple(self.streams.items()):
                progress = stream.progress
                if not progress:
                    continue
                if stream.request.body.buffered:
                    # Unread data holds the window: it is our reader the body waits for.
                    progress = stream.progress = now
                if now >= progress + body_timeout:
                    ctx.timed_out("body", self.peer)
                    self._abandon(stream_id, stream)
                else:
                    next_at = min(next_at, progress + body_timeout)
        if not self.streams and not self.goaway_sent:
            idle_until = self._idle_since + limits.idle_timeout
            if now >= idle_until:
                ctx.timed_out("idle", self.peer)
                self.send_goaway()  # graceful: the connection closes a moment after it
            else:
                next_at = min(next_at, idle_until)
        if not self.closed:
            self._timer = self.timers.call_at(next_at, self._on_timer)

    def _abandon(self, stream_id: int, stream: ServerStream) -> None:
        """The request body stopped arriving: reset the stream, end its call."""
        stream.request.body.fail(BodyError("request body not received in time"))
        self.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._reset(stream_id)

    # -- lifecycle --
    def send_goaway(self) -> None:
        """Graceful close: streams up to the last one seen finish, then the connection closes."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self.send_graceful_goaway(self.last_stream_id)
        self.close_if_idle()

    def close_if_idle(self) -> None:
        if self.ctx.draining and not self.goaway_sent:
            self.send_goaway()
            return
        if self.streams or self.transport is None or self._closing is not None:
            return
        self.flush_now()
        if self._client_left:
            self.transport.close()
            return
        # Our GOAWAY may still be on its way: streams the client opens meanwhile get
        # REFUSED_STREAM (safe to resend) if the connection is still here. Closing at
        # once would make the kernel answer them with RST, which can destroy the
        # GOAWAY before the client reads it, so the client could not tell they were
        # never processed.
        self._closing = self.timers.call_later(GOAWAY_GRACE_SECONDS, self._close_now)

    def _close_now(self) -> None:
        if self.transport is not None:
            self.flush_now()
            self.transport.close()


# What H2ServerProtocol.data_received() does with each engine event (the class's
# own functions, looked up once: an override in a subclass is not seen).
_ON_EVENT: dict[type, EventHandler[H2ServerProtocol]] = event_table(
    {
        h2.RequestReceived: H2ServerProtocol._request,
        h2.DataReceived: H2ServerProtocol._data,
        h2.StreamEnded: H2ServerProtocol._ended,
        h2.TrailersReceived: H2ServerProtocol._trailers,
        h2.WindowUpdated: H2ServerProtocol._window_updated,
        h2.StreamReset: H2ServerProtocol._stream_reset,
        h2.RemoteSettingsChanged: H2ServerProtocol._settings_changed,
        h2.PingReceived: H2ServerProtocol._ping,
        h2.ConnectionTerminated: H2ServerProtocol._client_goaway,
    }
)
