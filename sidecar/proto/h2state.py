"""What one HTTP/2 connection holds, and the steps every part of the engine takes on it.

`ConnectionState` is the engine's state: its settings and the peer's, both flow-control
windows, the open streams, the HPACK codecs, the output queue, a partial frame, a header
block being assembled. Its methods are the few that every kind of frame needs: queue a
frame, end one side of a stream, tell whether a stream id was ever opened. The engine's
parts (h2flow, h2headers, h2engine) are written as its subclasses, so each reads and
writes the one set of attributes directly; `H2Connection` combines them.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Mapping
from typing import Any

from h2.settings import SettingCodes

from sidecar.proto.h2events import Event, StreamEnded
from sidecar.proto.h2frames import DEFAULT_MAX_FRAME, DEFAULT_WINDOW, MAX_STREAM_ID, pack_frame_head

# How many of the streams we reset are remembered, so that what the peer had already
# sent on them is ignored (RFC 9113 5.1), not answered as a frame on a closed stream.
RESET_MEMORY = 64


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


class Stream:
    """An open stream: its two windows, which sides have ended, what its content-length
    promised and what has come of it."""

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


class ConnectionState:
    """One HTTP/2 connection's state, and the steps every kind of frame takes on it."""

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
        self.streams: dict[int, Stream] = {}
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

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        n = len(payload)
        self._out.append(pack_frame_head(n >> 8, n & 0xFF, kind, flags, stream_id))
        if payload:
            self._out.append(payload)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    def _end_local(self, stream_id: int, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def _end_remote(self, stream_id: int, stream: Stream, events: list[Event]) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            del self.streams[stream_id]
        events.append(StreamEnded(stream_id))

    def _is_idle(self, stream_id: int) -> bool:
        """Never opened: above the highest id either side has used."""
        if (stream_id & 1) == (1 if self.client_side else 0):
            return stream_id >= self._next_id  # one of ours
        return stream_id > self.highest_remote_id
