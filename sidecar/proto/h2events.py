"""The typed events of the HTTP/2 engine: what `H2Connection.receive_data()` returns.

Plain slotted dataclasses: the generated __init__ is the hand-written one (no
__post_init__, no frozen __setattr__), so an event costs what it did to make, and gains
a repr and field equality for tests and logs. Not frozen: a frozen dataclass sets each
field through object.__setattr__, twice the construction cost here.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]


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
