"""SETTINGS and flow control (RFC 9113 6.5, 6.9): what the engine tells the peer, what
the peer's SETTINGS change, and both windows in each direction.

Inbound, the application's consumption is returned to the peer in batches (once half a
window is used); outbound, WINDOW_UPDATE widens what `send_data()` may send, and
`local_flow_control_window()` says how much that is.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sidecar.proto.h2events import Event, RemoteSettingsChanged, WindowUpdated
from sidecar.proto.h2frames import (
    ACK,
    DEFAULT_MAX_FRAME,
    MAX_WINDOW,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    ProtocolError,
    StreamClosedError,
    StreamError,
    pack_setting,
    pack_u32,
    unpack_setting,
    unpack_u32,
)
from sidecar.proto.h2state import ConnectionState


class FlowControl(ConnectionState):
    """The connection's SETTINGS exchange and its flow-control windows."""

    # -- sending ------------------------------------------------------------------

    def initiate_connection(self) -> None:
        if self.client_side:
            self._out.append(PREFACE)
        payload = b"".join(pack_setting(k, v) for k, v in self.local_settings.items())
        self._frame(SETTINGS, 0, 0, payload)

    def increment_flow_control_window(self, increment: int) -> None:
        """Let the peer send `increment` more bytes on the connection."""
        self.inbound_flow_control_window += increment
        self.inbound_window_max += increment
        self._frame(WINDOW_UPDATE, 0, 0, pack_u32(increment))

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is closed")
        return min(self.outbound_flow_control_window, stream.out_window)

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """The application consumed `size` flow-controlled bytes: return the window to
        the peer once half of it is used (a WINDOW_UPDATE per frame would double the
        frames on the wire)."""
        self._inbound_unacked += size
        if self._inbound_unacked * 2 >= self.inbound_window_max:
            increment, self._inbound_unacked = self._inbound_unacked, 0
            self.inbound_flow_control_window += increment
            self._frame(WINDOW_UPDATE, 0, 0, pack_u32(increment))
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # the peer will send nothing more on it
        stream.unacked += size
        if stream.unacked * 2 >= self.local_window:
            increment, stream.unacked = stream.unacked, 0
            stream.window += increment
            self._frame(WINDOW_UPDATE, 0, stream_id, pack_u32(increment))

    # -- receiving ----------------------------------------------------------------

    def _on_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolError("malformed WINDOW_UPDATE", ErrorCodes.FRAME_SIZE_ERROR)
        increment = unpack_u32(payload)[0] & MAX_WINDOW
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
            raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR)
        stream.out_window += increment
        if stream.out_window > MAX_WINDOW:
            raise StreamError(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
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
            code, value = unpack_setting(payload, offset)
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
