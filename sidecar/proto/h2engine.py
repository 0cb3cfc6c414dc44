"""HTTP/2 (RFC 9113) connection state, Sans-IO: bytes in, events and bytes out.

Written for the sidecar's data path, where h2's general machinery (a state machine
object per stream, a frame object per frame, validation layers, a record of every
closed stream) cost ~0.47 ms per request/response exchange on this machine. Here a
frame is parsed with one `struct` call and handled in place, a stream is a small
record, and HPACK is jh2's compiled codec (h2's `hpack` when jh2 is missing).

What it keeps from the RFC: the preface and SETTINGS exchange, flow control on both
windows (inbound windows refilled in batches, outbound ones enforced), header blocks
split across CONTINUATION, padding, stream-id ordering, MAX_CONCURRENT_STREAMS
(REFUSED_STREAM), request/response header validation, content-length versus DATA,
PING, RST_STREAM and GOAWAY. Where it is lenient (a frame on a stream that has since
closed is ignored, not a connection error) the code says so. Streams that closed are
not remembered: ids only grow, so any id at or below the highest seen and not open is
closed.

This module is the engine's face (what the adapters import) and its frame loop: the
parsing of frames out of the bytes, DATA, RST_STREAM, PING, GOAWAY and PRIORITY. The
rest is one class in parts, each a subclass of h2state's `ConnectionState` (so every
part reads the same attributes, with no call or lookup between them): h2flow (SETTINGS
and flow control), h2headers (header blocks, HPACK, the h2fields checks). h2frames holds
the wire's vocabulary and the errors, h2events the events.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sidecar.proto.h2events import (
    EVENT_TYPES,
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from sidecar.proto.h2flow import FlowControl
from sidecar.proto.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_STREAM_ID,
    PADDED,
    PING,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    NoAvailableStreamIDError,
    ProtocolError,
    StreamClosedError,
    StreamError,
    pack_goaway,
    pack_u32,
    unpack_frame_head,
    unpack_goaway,
    unpack_u32,
    unpack_u32_from,
)
from sidecar.proto.h2frames import PREFACE as PREFACE
from sidecar.proto.h2headers import HeaderBlocks
from sidecar.proto.h2state import RESET_MEMORY as RESET_MEMORY
from sidecar.proto.h2state import _Encoder as _Encoder

# What the adapters use. The redundant `as` imports above re-export three more names, for
# the tests that build wire bytes by hand and check the engine's bounds.
__all__ = [
    "EVENT_TYPES",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCodes",
    "Event",
    "H2Connection",
    "NoAvailableStreamIDError",
    "PingAckReceived",
    "PingReceived",
    "ProtocolError",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "SettingCodes",
    "StreamClosedError",
    "StreamEnded",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]


class H2Connection(HeaderBlocks, FlowControl):
    """One HTTP/2 connection's state. `receive_data()` returns events; every send
    method queues bytes that `data_to_send()` hands over."""

    # -- sending ------------------------------------------------------------------

    def get_next_available_stream_id(self) -> int:
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise NoAvailableStreamIDError("no stream ids left on this connection")
        return stream_id

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed")
        size = len(data)
        limit = min(self.outbound_flow_control_window, stream.out_window)
        if size > limit or size > self.max_outbound_frame_size:
            raise ProtocolError(f"{size} bytes exceed the peer's window or frame size")
        self.outbound_flow_control_window -= size
        stream.out_window -= size
        self._frame(DATA, END_STREAM if end_stream else 0, stream_id, data)
        if end_stream:
            self._end_local(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        if self.streams.pop(stream_id, None) is None:
            raise StreamClosedError(f"stream {stream_id} is closed")
        self._frame(RST_STREAM, 0, stream_id, pack_u32(error_code))
        self._reset_sent.append(stream_id)

    def ping(self, data: bytes) -> None:
        self._frame(PING, 0, 0, data)

    def goaway(self, last_stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Queue a GOAWAY; streams up to `last_stream_id` may still finish (RFC 9113 6.8)."""
        self._frame(GOAWAY, 0, 0, pack_goaway(last_stream_id, error_code))

    def close_connection(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        self.goaway(self.highest_remote_id, error_code)

    # -- receiving ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what arrived. Raises ProtocolError (with a GOAWAY queued) on a
        connection error."""
        events: list[Event] = []
        if self._pending:
            # Part of a frame was waiting: gather pieces until it is whole, so a frame
            # that arrives a byte at a time is copied once, not once per byte.
            self._pending += data
            if len(self._pending) < self._pending_need:
                return events
            data = bytes(self._pending)
            self._pending.clear()
        buf = data
        pos = 0
        if self._preface_pending:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise self._fail("invalid connection preface")
                self._wait_for(buf, len(buf) + 1)
                return events
            if not buf.startswith(PREFACE):
                raise self._fail("invalid connection preface")
            self._preface_pending = False
            pos = len(PREFACE)
        end = len(buf)
        need = 9
        max_frame = self.local_max_frame
        try:
            while end - pos >= 9:
                length_hi, length_lo, kind, flags, stream_id = unpack_frame_head(buf, pos)
                length = (length_hi << 8) | length_lo
                if length > max_frame:
                    raise ProtocolError(
                        f"frame of {length} bytes over {max_frame}", ErrorCodes.FRAME_SIZE_ERROR
                    )
                if end - pos - 9 < length:
                    need = 9 + length
                    break
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                stream_id &= MAX_STREAM_ID
                if self._block_stream or not self._settings_seen:
                    if not self._settings_seen and kind != SETTINGS:
                        raise ProtocolError("the first frame must be SETTINGS")
                    if self._block_stream and kind != CONTINUATION:
                        raise ProtocolError("a header block was interrupted by another frame")
                try:
                    if kind == DATA:
                        self._on_data(flags, stream_id, payload, events)
                    elif kind == HEADERS:
                        self._on_headers(flags, stream_id, payload, events)
                    else:
                        self._dispatch(kind, flags, stream_id, payload, events)
                except StreamError as err:
                    self._reset_on_error(err, events)
        except ProtocolError as exc:
            raise self._fail(str(exc), exc.code) from None
        if pos < end:
            self._wait_for(buf[pos:] if pos else buf, need)
        return events

    def _wait_for(self, piece: bytes, need: int) -> None:
        """Keep the start of an incomplete frame (or preface) until `need` bytes are here."""
        self._pending += piece
        self._pending_need = need

    def _fail(self, message: str, code: int = ErrorCodes.PROTOCOL_ERROR) -> ProtocolError:
        self.goaway(self.highest_remote_id, code)
        return ProtocolError(message, code)

    def _reset_on_error(self, err: StreamError, events: list[Event]) -> None:
        stream_id = err.stream_id
        self.streams.pop(stream_id, None)
        self._frame(RST_STREAM, 0, stream_id, pack_u32(err.code))
        self._reset_sent.append(stream_id)
        # Reported even for a stream never announced (a malformed request), so that the
        # adapter can log why and count resets we were made to send (CVE-2025-8671).
        events.append(StreamReset(stream_id, err.code, remote=False, reason=err.reason))

    def _dispatch(
        self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        """Every frame type but DATA and HEADERS, which receive_data() handles inline."""
        if kind == CONTINUATION:
            self._on_continuation(flags, stream_id, payload, events)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload, events)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload, events)
        elif kind == RST_STREAM:
            self._on_rst_stream(stream_id, payload, events)
        elif kind == PING:
            if stream_id:
                raise ProtocolError("PING on a stream")
            if len(payload) != 8:
                raise ProtocolError("PING of a length not 8", ErrorCodes.FRAME_SIZE_ERROR)
            if flags & ACK:
                events.append(PingAckReceived(payload))
            else:
                self._frame(PING, ACK, 0, payload)
                events.append(PingReceived())
        elif kind == GOAWAY:
            if stream_id:
                raise ProtocolError("GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError("GOAWAY shorter than 8 bytes", ErrorCodes.FRAME_SIZE_ERROR)
            last, code = unpack_goaway(payload)
            self.goaway_received = True
            events.append(ConnectionTerminated(code, last & MAX_STREAM_ID))
        elif kind == PRIORITY:
            if not stream_id:
                raise ProtocolError("PRIORITY on stream 0")
            if len(payload) != 5:
                raise StreamError(stream_id, ErrorCodes.FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")
            if unpack_u32_from(payload)[0] & MAX_STREAM_ID == stream_id:
                raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, "depends on itself")
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE was not enabled")
        # Unknown frame types are ignored (RFC 9113 5.5).

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise ProtocolError("DATA on stream 0")
        size = len(payload)
        if size > self.inbound_flow_control_window:
            raise ProtocolError(
                "the peer overran the connection window", ErrorCodes.FLOW_CONTROL_ERROR
            )
        self.inbound_flow_control_window -= size
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed or not stream.head_received:
            if self._is_idle(stream_id):
                raise ProtocolError(f"DATA on idle stream {stream_id}")
            # The data is dropped and its connection window given back at once. On a
            # stream we reset, the peer may have sent it before it knew: ignored. On
            # one the peer ended or reset, it is a STREAM_CLOSED error (RFC 9113 5.1),
            # answered once: the RST_STREAM puts the stream among those we reset.
            self.acknowledge_received_data(size, 0)
            if stream is None and stream_id in self._reset_sent:
                return
            raise StreamError(stream_id, ErrorCodes.STREAM_CLOSED, "DATA on a closed stream")
        if size > stream.window:
            self.acknowledge_received_data(size, 0)
            raise StreamError(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
        stream.window -= size
        data = payload
        if flags & PADDED:
            if not size or payload[0] >= size:
                raise ProtocolError("padding longer than the DATA frame")
            data = payload[1 : size - payload[0]]
        if stream.expected_length >= 0:
            stream.received_length += len(data)
            if stream.received_length > stream.expected_length or (
                flags & END_STREAM and stream.received_length != stream.expected_length
            ):
                self.acknowledge_received_data(size, 0)
                raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR)
        events.append(DataReceived(stream_id, data, size))
        if flags & END_STREAM:
            self._end_remote(stream_id, stream, events)

    def _on_rst_stream(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise ProtocolError("RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError("malformed RST_STREAM", ErrorCodes.FRAME_SIZE_ERROR)
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            if self._is_idle(stream_id):
                raise ProtocolError(f"RST_STREAM on idle stream {stream_id}")
            return
        events.append(StreamReset(stream_id, unpack_u32(payload)[0]))
