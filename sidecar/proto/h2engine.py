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
closed is ignored, not a connection error) it says so below. Streams that closed are
not remembered: ids only grow, so any id at or below the highest seen and not open is
closed.
"""

from __future__ import annotations

import importlib
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sidecar.proto.h2fields import (
    HpackViolation,
    Malformed,
    check_hpack_block,
    check_trailers,
    request_length,
    response_length,
)

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

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_MAX_FRAME = 16384

_FRAME_HEAD = struct.Struct(">HBBBI")  # length hi 16, length lo 8, type, flags, stream id
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")
_SETTING = struct.Struct(">HI")

Headers = list[tuple[bytes, bytes]]

# How many of the streams we reset are remembered, so that what the peer had already
# sent on them is ignored (RFC 9113 5.1), not answered as a frame on a closed stream.
RESET_MEMORY = 64
# A flag of our own (beyond the wire's 8 bits) carried with a header block: its HEADERS
# made the stream depend on itself (RFC 9113 5.3.1).
_SELF_DEPENDENT = 0x100


def _hpack() -> tuple[Any, Any, bool]:
    """jh2's compiled HPACK codec (~5 us to encode and decode a request head here),
    else the pure-Python `hpack` that h2 depends on (~70 us)."""
    try:
        codec = importlib.import_module("jh2._hazmat")
        return codec.Encoder, codec.Decoder, True
    except ImportError:  # pragma: no cover - jh2 is a dependency
        codec = importlib.import_module("hpack")
        return codec.Encoder, codec.Decoder, False


_Encoder, _Decoder, COMPILED_HPACK = _hpack()


class ProtocolError(Exception):
    """A connection error: a GOAWAY with `code` is queued; close after sending it."""

    def __init__(self, message: str, code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StreamClosedError(Exception):
    """Sending on a stream that is closed (reset, finished or never opened)."""


class NoAvailableStreamIDError(Exception):
    """The connection has used every client stream id."""


class _StreamError(Exception):
    def __init__(self, stream_id: int, code: int, reason: str = "") -> None:
        super().__init__(stream_id, code, reason)
        self.stream_id = stream_id
        self.code = code
        self.reason = reason


# -- events -------------------------------------------------------------------------
# Plain slotted dataclasses: the generated __init__ is the hand-written one (no
# __post_init__, no frozen __setattr__), so an event costs what it did to make, and
# gains a repr and field equality for tests and logs. Not frozen: a frozen dataclass
# sets each field through object.__setattr__, twice the construction cost here.


class Event:
    """What `H2Connection.receive_data()` returns, one per thing that happened."""

    __slots__ = ()


@dataclass(slots=True)
class RequestReceived(Event):
    stream_id: int
    headers: Headers
    stream_ended: bool


@dataclass(slots=True)
class ResponseReceived(Event):
    """The final response head (informational ones are dropped)."""

    stream_id: int
    headers: Headers
    stream_ended: bool


@dataclass(slots=True)
class TrailersReceived(Event):
    stream_id: int
    headers: Headers


@dataclass(slots=True)
class DataReceived(Event):
    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(slots=True)
class StreamEnded(Event):
    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The peer reset the stream, or we did (`remote` False) because what it sent was
    malformed or broke the protocol: `reason` says how."""

    stream_id: int
    error_code: int
    remote: bool = True
    reason: str = ""


@dataclass(slots=True)
class WindowUpdated(Event):
    stream_id: int  # 0: the connection's window


@dataclass(slots=True, init=False)  # no fields: object's __init__, no call
class RemoteSettingsChanged(Event):
    pass


@dataclass(slots=True, init=False)  # no fields: object's __init__, no call
class PingReceived(Event):
    pass


@dataclass(slots=True)
class PingAckReceived(Event):
    data: bytes


@dataclass(slots=True)
class ConnectionTerminated(Event):
    error_code: int
    last_stream_id: int


# Every event type receive_data() makes: an adapter's dispatch table covers them all.
EVENT_TYPES: tuple[type[Event], ...] = (
    RequestReceived,
    ResponseReceived,
    TrailersReceived,
    DataReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
    RemoteSettingsChanged,
    PingReceived,
    PingAckReceived,
    ConnectionTerminated,
)


# -- streams ------------------------------------------------------------------------


class _Stream:
    __slots__ = (
        "expected_length",
        "head_received",
        "local_closed",
        "out_window",
        "received_length",
        "remote_closed",
        "unacked",
        "window",
    )

    def __init__(self, out_window: int, window: int) -> None:
        self.out_window = out_window  # what we may still send
        self.window = window  # what the peer may still send
        self.unacked = 0  # consumed by the application, not yet returned to the peer
        self.local_closed = False
        self.remote_closed = False
        self.head_received = False
        self.expected_length = -1  # the peer's content-length, -1: none
        self.received_length = 0


# -- the connection -----------------------------------------------------------------


class H2Connection:
    """One HTTP/2 connection's state. `receive_data()` returns events; every send
    method queues bytes that `data_to_send()` hands over."""

    def __init__(
        self,
        *,
        client_side: bool,
        settings: Mapping[int, int] | None = None,
    ) -> None:
        self.client_side = client_side
        local: dict[int, int] = {
            SettingCodes.HEADER_TABLE_SIZE: 4096,
            SettingCodes.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: DEFAULT_MAX_FRAME,
        }
        if client_side:
            local[SettingCodes.ENABLE_PUSH] = 0
        local.update(settings or {})
        self.local_settings = local
        self.local_window = local[SettingCodes.INITIAL_WINDOW_SIZE]
        self.local_max_frame = local[SettingCodes.MAX_FRAME_SIZE]
        self.local_max_streams = local.get(SettingCodes.MAX_CONCURRENT_STREAMS, MAX_STREAM_ID)
        self.max_header_list_size = local.get(SettingCodes.MAX_HEADER_LIST_SIZE, 65536)
        # Peer settings (RFC 9113 6.5.2 initial values until its SETTINGS arrive).
        self.remote_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME
        self.remote_max_concurrent_streams = MAX_STREAM_ID
        # Connection level: what we may send, what the peer may send.
        self.outbound_flow_control_window = DEFAULT_WINDOW
        self.inbound_flow_control_window = DEFAULT_WINDOW
        self.inbound_window_max = DEFAULT_WINDOW
        self._inbound_unacked = 0
        self.streams: dict[int, _Stream] = {}
        self.highest_remote_id = 0
        self._next_id = 1 if client_side else 2
        self.goaway_received = False
        self._encoder = _Encoder()
        self._decoder = _Decoder(self.max_header_list_size)
        self._out: list[bytes] = []
        # An incomplete frame (bounded by the frame size limit), and the size that
        # completes it.
        self._pending = bytearray()
        self._pending_need = 0
        self._reset_sent: deque[int] = deque(maxlen=RESET_MEMORY)
        # A header block is bounded in wire bytes (each frame header counted, so a flood
        # of empty CONTINUATION frames is bounded too): an encoded block is no larger
        # than the header list it decodes to, whose size the peer was told.
        self._block_limit = self.max_header_list_size + DEFAULT_MAX_FRAME
        self._preface_pending = not client_side
        self._settings_seen = False
        # A header block being assembled: (stream id, flags of its HEADERS, fragments).
        self._block_stream = 0
        self._block_flags = 0
        self._block: list[bytes] = []
        self._block_size = 0

    # -- sending ------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        n = len(payload)
        self._out.append(_FRAME_HEAD.pack(n >> 8, n & 0xFF, kind, flags, stream_id))
        if payload:
            self._out.append(payload)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    def initiate_connection(self) -> None:
        if self.client_side:
            self._out.append(PREFACE)
        payload = b"".join(_SETTING.pack(k, v) for k, v in self.local_settings.items())
        self._frame(SETTINGS, 0, 0, payload)

    def increment_flow_control_window(self, increment: int) -> None:
        """Let the peer send `increment` more bytes on the connection."""
        self.inbound_flow_control_window += increment
        self.inbound_window_max += increment
        self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))

    def get_next_available_stream_id(self) -> int:
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise NoAvailableStreamIDError("no stream ids left on this connection")
        return stream_id

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id != self._next_id:
                raise StreamClosedError(f"stream {stream_id} is not open")
            stream = _Stream(self.remote_window, self.local_window)
            self.streams[stream_id] = stream
            self._next_id = stream_id + 2
        elif stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} already ended")
        block = self._encoder.encode([(name, value, False) for name, value in headers])
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._frame(HEADERS, flags, stream_id, block[:limit])
            for start in range(limit, len(block), limit):
                last = start + limit >= len(block)
                piece = block[start : start + limit]
                self._frame(CONTINUATION, END_HEADERS if last else 0, stream_id, piece)
        if end_stream:
            self._end_local(stream_id, stream)

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is closed")
        return min(self.outbound_flow_control_window, stream.out_window)

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

    def _end_local(self, stream_id: int, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        if self.streams.pop(stream_id, None) is None:
            raise StreamClosedError(f"stream {stream_id} is closed")
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))
        self._reset_sent.append(stream_id)

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """The application consumed `size` flow-controlled bytes: return the window to
        the peer once half of it is used (a WINDOW_UPDATE per frame would double the
        frames on the wire)."""
        self._inbound_unacked += size
        if self._inbound_unacked * 2 >= self.inbound_window_max:
            increment, self._inbound_unacked = self._inbound_unacked, 0
            self.inbound_flow_control_window += increment
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # the peer will send nothing more on it
        stream.unacked += size
        if stream.unacked * 2 >= self.local_window:
            increment, stream.unacked = stream.unacked, 0
            stream.window += increment
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))

    def ping(self, data: bytes) -> None:
        self._frame(PING, 0, 0, data)

    def goaway(self, last_stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Queue a GOAWAY; streams up to `last_stream_id` may still finish (RFC 9113 6.8)."""
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, error_code))

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
                length_hi, length_lo, kind, flags, stream_id = _FRAME_HEAD.unpack_from(buf, pos)
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
                except _StreamError as err:
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

    def _reset_on_error(self, err: _StreamError, events: list[Event]) -> None:
        stream_id = err.stream_id
        self.streams.pop(stream_id, None)
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(err.code))
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
            last, code = _GOAWAY.unpack_from(payload)
            self.goaway_received = True
            events.append(ConnectionTerminated(code, last & MAX_STREAM_ID))
        elif kind == PRIORITY:
            if not stream_id:
                raise ProtocolError("PRIORITY on stream 0")
            if len(payload) != 5:
                raise _StreamError(stream_id, ErrorCodes.FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")
            if _U32.unpack_from(payload)[0] & MAX_STREAM_ID == stream_id:
                raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, "depends on itself")
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
            raise _StreamError(stream_id, ErrorCodes.STREAM_CLOSED, "DATA on a closed stream")
        if size > stream.window:
            self.acknowledge_received_data(size, 0)
            raise _StreamError(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
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
                raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR)
        events.append(DataReceived(stream_id, data, size))
        if flags & END_STREAM:
            self._end_remote(stream_id, stream, events)

    def _end_remote(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            del self.streams[stream_id]
        events.append(StreamEnded(stream_id))

    def _is_idle(self, stream_id: int) -> bool:
        """Never opened: above the highest id either side has used."""
        if (stream_id & 1) == (1 if self.client_side else 0):
            return stream_id >= self._next_id  # one of ours
        return stream_id > self.highest_remote_id

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise ProtocolError("HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not end or payload[0] + 1 > end:
                raise ProtocolError("padding longer than the HEADERS frame")
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
            if start > end:
                raise ProtocolError("HEADERS too short for its priority fields")
            if _U32.unpack_from(payload, start - 5)[0] & MAX_STREAM_ID == stream_id:
                flags |= _SELF_DEPENDENT
        fragment = payload[start:end]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, fragment, events)
        else:
            self._block_stream, self._block_flags = stream_id, flags
            self._block, self._block_size = [fragment], len(fragment)

    def _on_continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != self._block_stream or not stream_id:
            raise ProtocolError("CONTINUATION without a header block to continue")
        if payload:
            self._block.append(payload)
        self._block_size += 9 + len(payload)
        if self._block_size > self._block_limit:
            raise ProtocolError(
                f"header block over {self._block_limit} bytes", ErrorCodes.ENHANCE_YOUR_CALM
            )
        if flags & END_HEADERS:
            block, self._block = b"".join(self._block), []
            block_flags, self._block_stream = self._block_flags, 0
            self._header_block(stream_id, block_flags, block, events)

    def _decode(self, block: bytes) -> Headers:
        try:
            if COMPILED_HPACK:
                headers = [(h[0], h[1]) for h in self._decoder.decode(block, True)]
                # What jh2's decoder lets through (hpack's refuses it itself).
                check_hpack_block(block, headers)
                return headers
            return [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        except (KeyboardInterrupt, SystemExit):  # pragma: no cover
            raise
        except HpackViolation as exc:
            raise ProtocolError(f"header block: {exc}", ErrorCodes.COMPRESSION_ERROR) from None
        except BaseException as exc:
            # jh2's codec reports some malformed input as a Rust panic, which Python
            # sees as a BaseException: either way the decoder state is lost.
            code = ErrorCodes.COMPRESSION_ERROR
            if "DDoS" in str(exc) or "Oversized" in type(exc).__name__:
                code = ErrorCodes.ENHANCE_YOUR_CALM
            raise ProtocolError(f"header block not decodable: {exc}", code) from None

    def _header_block(self, stream_id: int, flags: int, block: bytes, events: list[Event]) -> None:
        # Decode first, whatever happens to the stream: HPACK state is per connection.
        headers = self._decode(block)
        end_stream = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.client_side or not (stream_id & 1) or stream_id <= self.highest_remote_id:
                self._closed_stream_headers(stream_id, headers)
                return
            self.highest_remote_id = stream_id
            if flags & _SELF_DEPENDENT:
                raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, "depends on itself")
            if len(self.streams) >= self.local_max_streams:
                raise _StreamError(stream_id, ErrorCodes.REFUSED_STREAM, "too many streams")
            # Until our SETTINGS are acknowledged the peer may assume the default window.
            stream = _Stream(self.remote_window, max(self.local_window, DEFAULT_WINDOW))
            self.streams[stream_id] = stream
            self._on_head(stream_id, stream, headers, end_stream, events)
            return
        if flags & _SELF_DEPENDENT:
            raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, "depends on itself")
        if stream.remote_closed:
            raise _StreamError(stream_id, ErrorCodes.STREAM_CLOSED, "HEADERS after END_STREAM")
        if not stream.head_received:
            self._on_head(stream_id, stream, headers, end_stream, events)
            return
        # Trailers: they end the stream and carry no pseudo-header.
        try:
            if not end_stream:
                raise Malformed("a second header block without END_STREAM")
            check_trailers(headers)
        except Malformed as exc:
            raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, str(exc)) from None
        events.append(TrailersReceived(stream_id, headers))
        self._end_remote(stream_id, stream, events)

    def _closed_stream_headers(self, stream_id: int, headers: Headers) -> None:
        """A header block on a stream that is not open (RFC 9113 5.1, 5.1.1)."""
        if self._is_idle(stream_id):
            raise ProtocolError(f"HEADERS on unopened stream {stream_id}")
        if self.client_side or stream_id in self._reset_sent:
            return  # sent before the peer saw our RST_STREAM, or a late one of ours
        if any(name[:1] == b":" for name, _ in headers):
            # New streams must use ids higher than every id before them.
            raise ProtocolError(f"stream id {stream_id} is not higher than the last")
        raise _StreamError(stream_id, ErrorCodes.STREAM_CLOSED, "trailers on a closed stream")

    def _on_head(
        self,
        stream_id: int,
        stream: _Stream,
        headers: Headers,
        end_stream: bool,
        events: list[Event],
    ) -> None:
        event: RequestReceived | ResponseReceived
        try:
            if self.client_side:
                length = response_length(headers)
                if headers[0][1][:1] == b"1":
                    if end_stream:
                        raise Malformed("an informational response ends the stream")
                    return  # informational: the real response follows
                event = ResponseReceived(stream_id, headers, end_stream)
            else:
                length = request_length(headers)
                event = RequestReceived(stream_id, headers, end_stream)
            if end_stream and length > 0:
                raise Malformed(f"content-length {length} on a stream that ends")
        except Malformed as exc:
            raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, str(exc)) from None
        stream.expected_length = length
        stream.head_received = True
        events.append(event)
        if end_stream:
            self._end_remote(stream_id, stream, events)

    def _on_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolError("malformed WINDOW_UPDATE", ErrorCodes.FRAME_SIZE_ERROR)
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if not stream_id:
            if not increment:
                raise ProtocolError("WINDOW_UPDATE of 0 on the connection")
            self.outbound_flow_control_window += increment
            if self.outbound_flow_control_window > MAX_WINDOW:
                raise ProtocolError("connection window over 2^31-1", ErrorCodes.FLOW_CONTROL_ERROR)
            events.append(WindowUpdated(0))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise ProtocolError(f"WINDOW_UPDATE on idle stream {stream_id}")
            return
        if not increment:
            raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR)
        stream.out_window += increment
        if stream.out_window > MAX_WINDOW:
            raise _StreamError(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
        events.append(WindowUpdated(stream_id))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise ProtocolError("SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError("SETTINGS ACK with a payload", ErrorCodes.FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise ProtocolError(
                "SETTINGS of a length not a multiple of 6", ErrorCodes.FRAME_SIZE_ERROR
            )
        self._settings_seen = True
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == SettingCodes.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(
                        "INITIAL_WINDOW_SIZE over 2^31-1", ErrorCodes.FLOW_CONTROL_ERROR
                    )
                delta = value - self.remote_window
                self.remote_window = value
                for stream in self.streams.values():
                    stream.out_window += delta
                    if stream.out_window > MAX_WINDOW:  # RFC 9113 6.9.2
                        raise ProtocolError(
                            "INITIAL_WINDOW_SIZE takes a window over 2^31-1",
                            ErrorCodes.FLOW_CONTROL_ERROR,
                        )
            elif code == SettingCodes.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise ProtocolError(f"MAX_FRAME_SIZE {value} out of range")
                self.max_outbound_frame_size = value
            elif code == SettingCodes.MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif code == SettingCodes.HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, 4096)
            elif code == SettingCodes.ENABLE_PUSH and (value > 1 or (value and self.client_side)):
                raise ProtocolError(f"ENABLE_PUSH {value}")
        self._frame(SETTINGS, ACK, 0)
        events.append(RemoteSettingsChanged())

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
        events.append(StreamReset(stream_id, _U32.unpack(payload)[0]))
