"""HTTP/2's wire vocabulary (RFC 9113 4, 6): frame types and flags, the connection
preface, the RFC's limits and initial values, the structs that pack and unpack a frame
header and the fixed payload fields; and the errors the engine judges frames by.
"""

from __future__ import annotations

import struct

from h2.errors import ErrorCodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_MAX_FRAME = 16384

# The frame header and the fixed payload fields. What the engine's modules import is the
# structs' bound methods: a call of one is a global lookup and a call, as a method call on
# a struct defined in the same module is; on an imported struct (`U32.pack(...)`) CPython
# compiles an attribute load instead, which makes a bound method on every call.
_FRAME_HEAD = struct.Struct(">HBBBI")  # length hi 16, length lo 8, type, flags, stream id
pack_frame_head, unpack_frame_head = _FRAME_HEAD.pack, _FRAME_HEAD.unpack_from
_U32 = struct.Struct(">I")
pack_u32, unpack_u32, unpack_u32_from = _U32.pack, _U32.unpack, _U32.unpack_from
_GOAWAY = struct.Struct(">II")  # last stream id, error code
pack_goaway, unpack_goaway = _GOAWAY.pack, _GOAWAY.unpack_from
_SETTING = struct.Struct(">HI")  # identifier, value
pack_setting, unpack_setting = _SETTING.pack, _SETTING.unpack_from


class ProtocolError(Exception):
    """A connection error: a GOAWAY with `code` is queued; close after sending it."""

    def __init__(self, message: str, code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StreamClosedError(Exception):
    """Sending on a stream that is closed (reset, finished or never opened)."""


class NoAvailableStreamIDError(Exception):
    """The connection has used every client stream id."""


class StreamError(Exception):
    """A stream error, inside the engine only: `receive_data()` answers it with
    RST_STREAM and reports a StreamReset."""

    def __init__(self, stream_id: int, code: int, reason: str = "") -> None:
        super().__init__(stream_id, code, reason)
        self.stream_id = stream_id
        self.code = code
        self.reason = reason
