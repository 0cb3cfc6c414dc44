"""HTTP/2 conformance, unit tier: RFC 9113 and RFC 7541 section by section, every MUST a
server-side endpoint can be tested for, driven with raw frames (hyperframe; hpack's
Encoder or hand-made HPACK bytes) against the engine, asserting the connection error
(GOAWAY code) or stream error (RST_STREAM code) the RFC names. This stands in for
h2spec, which cannot be installed here; tests/integration/test_h2_conformance_live.py
runs a subset against a live listener."""

from __future__ import annotations

from typing import Any

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from sidecar.proto import h2engine as engine
from sidecar.proto import h2fields
from sidecar.proto.h2engine import ErrorCodes, SettingCodes

REQUEST = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "svc")]
E = ErrorCodes


class Peer:
    """A raw client in front of a server-side engine, past the preface and SETTINGS."""

    def __init__(self, **settings: int) -> None:
        local = {int(code): value for code, value in settings.items()}
        self.conn = engine.H2Connection(client_side=False, settings=local)
        self.conn.initiate_connection()
        self.encoder = Encoder()
        self.conn.receive_data(engine.PREFACE + SettingsFrame(0).serialize())
        self.conn.data_to_send()

    def block(self, headers: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(headers)

    def headers(
        self, stream_id: int, headers: list | None = None, end_stream: bool = True, **kw: Any
    ) -> HeadersFrame:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        frame = HeadersFrame(stream_id, flags=flags, **kw)
        frame.data = self.block(REQUEST if headers is None else headers)
        return frame

    def send(self, *frames: Frame | bytes) -> list[engine.Event]:
        wire = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        return self.conn.receive_data(wire)

    def out(self) -> list[Frame]:
        data, result = self.conn.data_to_send(), []
        while data:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            result.append(frame)
            data = data[9 + length :]
        return result

    def connection_error(self, *frames: Frame | bytes) -> int:
        """Send; the engine must fail the connection: the GOAWAY's code."""
        with pytest.raises(engine.ProtocolError):
            self.send(*frames)
        goaway = self.out()[-1]
        assert isinstance(goaway, GoAwayFrame)
        return goaway.error_code

    def stream_error(self, *frames: Frame | bytes) -> tuple[int, int]:
        """Send; the engine must reset a stream, never announcing it as a request:
        (stream id, RST_STREAM code)."""
        events = self.send(*frames)
        assert not [e for e in events if isinstance(e, engine.RequestReceived)]
        resets = [f for f in self.out() if isinstance(f, RstStreamFrame)]
        assert resets, "no RST_STREAM"
        return resets[-1].stream_id, resets[-1].error_code


def raw_headers(stream_id: int, block: bytes, flags: tuple[str, ...] = ()) -> HeadersFrame:
    frame = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM", *flags])
    frame.data = block
    return frame


# -- 3.4 / 3.5 connection preface ---------------------------------------------------


def test_3_4_invalid_preface_is_protocol_error() -> None:
    """The client connection preface starts with a sequence of 24 octets ... [an
    invalid one] MUST be treated as a connection error of type PROTOCOL_ERROR."""
    conn = engine.H2Connection(client_side=False)
    conn.initiate_connection()
    with pytest.raises(engine.ProtocolError):
        conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    data = conn.data_to_send()
    goaway = GoAwayFrame(0)
    goaway.parse_body(memoryview(data[-8:]))
    assert data[-17 + 3] == 7 and goaway.error_code == E.PROTOCOL_ERROR


def test_3_4_first_frame_not_settings_is_protocol_error() -> None:
    """The preface ... MUST be followed by a SETTINGS frame."""
    conn = engine.H2Connection(client_side=False)
    with pytest.raises(engine.ProtocolError) as err:
        conn.receive_data(engine.PREFACE + PingFrame(0).serialize())
    assert err.value.code == E.PROTOCOL_ERROR


def test_3_4_preface_split_anywhere_is_accepted() -> None:
    """(The preface may arrive in any number of reads.)"""
    conn = engine.H2Connection(client_side=False)
    wire = engine.PREFACE + SettingsFrame(0).serialize()
    events = []
    for i in range(len(wire)):
        events += conn.receive_data(wire[i : i + 1])
    assert [type(e) for e in events] == [engine.RemoteSettingsChanged]


# -- 4.1 frame format, 4.2 frame size, 4.3 header compression -----------------------


def test_4_1_unknown_frame_type_is_ignored() -> None:
    """Implementations MUST ignore and discard frames of unknown types."""
    peer = Peer()
    unknown = b"\x00\x00\x03\xee\x00\x00\x00\x00\x00abc"
    events = peer.send(unknown, peer.headers(1))
    assert isinstance(events[0], engine.RequestReceived)


def test_4_1_undefined_flags_and_reserved_bit_are_ignored() -> None:
    """Unused flags MUST be ignored on receipt; the reserved bit MUST be ignored."""
    peer = Peer()
    ping = bytearray(PingFrame(0, opaque_data=b"12345678").serialize())
    ping[4] |= 0xF0  # undefined flags
    ping[5] |= 0x80  # reserved bit
    assert [type(e) for e in peer.send(bytes(ping))] == [engine.PingReceived]


def test_4_2_frame_over_max_frame_size_is_frame_size_error() -> None:
    """An endpoint MUST send an error code of FRAME_SIZE_ERROR if a frame exceeds the
    size defined in SETTINGS_MAX_FRAME_SIZE."""
    peer = Peer()
    head = b"\x00\x40\x01\x00\x00\x00\x00\x00\x01"  # DATA of 16385 bytes
    assert peer.connection_error(head) == E.FRAME_SIZE_ERROR


def test_4_3_undecodable_header_block_is_compression_error() -> None:
    """A decoding error in a field block MUST be treated as a connection error of type
    COMPRESSION_ERROR."""
    assert Peer().connection_error(raw_headers(1, b"\x80")) == E.COMPRESSION_ERROR


def test_4_3_header_block_interrupted_is_protocol_error() -> None:
    """Field blocks MUST be transmitted as a contiguous sequence of frames, with no
    interleaved frames of any other type or from any other stream."""
    peer = Peer()
    head = peer.headers(1)
    head.flags.discard("END_HEADERS")
    assert peer.connection_error(head, PingFrame(0)) == E.PROTOCOL_ERROR


def test_4_3_header_block_continued_on_another_stream_is_protocol_error() -> None:
    """(As above: no frames from any other stream.)"""
    peer = Peer()
    head = peer.headers(1)
    head.flags.discard("END_HEADERS")
    cont = ContinuationFrame(3, flags=["END_HEADERS"])
    assert peer.connection_error(head, cont) == E.PROTOCOL_ERROR


# -- 5.1 stream states ---------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        DataFrame(1, data=b"x"),
        RstStreamFrame(1),
        WindowUpdateFrame(1, window_increment=1),
        ContinuationFrame(1, flags=["END_HEADERS"]),
    ],
    ids=["DATA", "RST_STREAM", "WINDOW_UPDATE", "CONTINUATION"],
)
def test_5_1_frame_on_idle_stream_is_protocol_error(frame: Frame) -> None:
    """idle: Receiving any frame other than HEADERS or PRIORITY on a stream in this
    state MUST be treated as a connection error of type PROTOCOL_ERROR."""
    assert Peer().connection_error(frame) == E.PROTOCOL_ERROR


def test_5_1_data_on_half_closed_remote_is_stream_closed() -> None:
    """half-closed (remote): If an endpoint receives additional frames, other than
    WINDOW_UPDATE, PRIORITY, or RST_STREAM ... stream error of type STREAM_CLOSED."""
    peer = Peer()
    peer.send(peer.headers(1))
    assert peer.stream_error(DataFrame(1, data=b"x")) == (1, E.STREAM_CLOSED)


def test_5_1_headers_on_half_closed_remote_is_stream_closed() -> None:
    """(As above, for HEADERS.)"""
    peer = Peer()
    peer.send(peer.headers(1))
    assert peer.stream_error(peer.headers(1, [("x-a", "1")])) == (1, E.STREAM_CLOSED)


def test_5_1_data_after_rst_stream_is_stream_closed() -> None:
    """closed: An endpoint that receives any frame other than PRIORITY after receiving
    a RST_STREAM MUST treat that as a stream error of type STREAM_CLOSED."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False), RstStreamFrame(1))
    assert peer.stream_error(DataFrame(1, data=b"x")) == (1, E.STREAM_CLOSED)


def test_5_1_data_on_closed_stream_is_stream_closed() -> None:
    """closed: ... an endpoint that receives any frames after receiving a frame with
    the END_STREAM flag set [on a stream now closed] MUST treat that as an error of
    type STREAM_CLOSED."""
    peer = Peer()
    peer.send(peer.headers(1))
    peer.conn.send_headers(1, [(b":status", b"204")], end_stream=True)
    assert 1 not in peer.conn.streams
    peer.out()
    assert peer.stream_error(DataFrame(1, data=b"x")) == (1, E.STREAM_CLOSED)
    # Answered once: what follows on the stream we have now reset is ignored.
    assert peer.send(DataFrame(1, data=b"x")) == [] and peer.out() == []


def test_5_1_frames_after_we_sent_rst_stream_are_ignored() -> None:
    """An endpoint MUST ignore frames that it receives on closed streams after it has
    sent a RST_STREAM frame."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    peer.conn.reset_stream(1)
    peer.out()
    trailers = peer.headers(1, [("x-t", "1")])
    assert peer.send(DataFrame(1, data=b"late"), trailers) == []
    assert peer.out() == []


def test_5_1_1_even_stream_id_from_client_is_protocol_error() -> None:
    """Streams initiated by a client MUST use odd-numbered stream identifiers ...
    connection error of type PROTOCOL_ERROR."""
    peer = Peer()
    assert peer.connection_error(peer.headers(2)) == E.PROTOCOL_ERROR


def test_5_1_1_stream_id_lower_than_before_is_protocol_error() -> None:
    """The identifier of a newly established stream MUST be numerically greater than
    all streams that the initiating endpoint has opened."""
    peer = Peer()
    peer.send(peer.headers(5))
    assert peer.connection_error(peer.headers(3)) == E.PROTOCOL_ERROR


def test_5_1_2_streams_over_max_concurrent_are_refused() -> None:
    """An endpoint that receives a HEADERS frame that causes its advertised concurrent
    stream limit to be exceeded MUST treat this as a stream error of type
    PROTOCOL_ERROR or REFUSED_STREAM."""
    peer = Peer(**{str(SettingCodes.MAX_CONCURRENT_STREAMS.value): 1})
    peer.send(peer.headers(1, end_stream=False))
    assert peer.stream_error(peer.headers(3, end_stream=False)) == (3, E.REFUSED_STREAM)


# -- 5.3.1 stream dependencies, 5.4 error handling, 5.5 extensions ------------------


def test_5_3_1_headers_depending_on_itself_is_protocol_error() -> None:
    """A stream cannot depend on itself. An endpoint MUST treat this as a stream error
    of type PROTOCOL_ERROR. (And the request is not served.)"""
    peer = Peer()
    frame = peer.headers(1, depends_on=1, stream_weight=16)
    frame.flags.add("PRIORITY")
    assert peer.stream_error(frame) == (1, E.PROTOCOL_ERROR)


def test_5_3_1_priority_depending_on_itself_is_protocol_error() -> None:
    """(As above, for a PRIORITY frame.)"""
    peer = Peer()
    assert peer.stream_error(PriorityFrame(3, depends_on=3)) == (3, E.PROTOCOL_ERROR)


def test_5_4_1_connection_error_sends_goaway_with_last_stream() -> None:
    """An endpoint that encounters a connection error SHOULD first send a GOAWAY frame
    ... with the stream identifier of the last stream that it successfully received."""
    peer = Peer()
    peer.send(peer.headers(3))
    peer.out()
    with pytest.raises(engine.ProtocolError):
        peer.send(_DATA_ON_0)
    goaway = peer.out()[-1]
    assert isinstance(goaway, GoAwayFrame) and goaway.last_stream_id == 3


def test_5_5_unknown_frame_inside_header_block_is_protocol_error() -> None:
    """Extension frames that appear in the middle of a field block are not permitted;
    these MUST be treated as a connection error of type PROTOCOL_ERROR."""
    peer = Peer()
    head = peer.headers(1)
    head.flags.discard("END_HEADERS")
    unknown = b"\x00\x00\x00\xee\x00\x00\x00\x00\x01"
    assert peer.connection_error(head, unknown) == E.PROTOCOL_ERROR


# -- 6.1 DATA ... 6.10 CONTINUATION --------------------------------------------------


_DATA_ON_0 = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"


def test_6_1_data_on_stream_0_is_protocol_error() -> None:
    """If a DATA frame is received whose Stream Identifier field is 0x00, the recipient
    MUST respond with a connection error of type PROTOCOL_ERROR."""
    assert Peer().connection_error(_DATA_ON_0) == E.PROTOCOL_ERROR


def test_6_1_data_padding_too_long_is_protocol_error() -> None:
    """If the length of the padding is the length of the frame payload or greater, the
    recipient MUST treat this as a connection error of type PROTOCOL_ERROR."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    bad = b"\x00\x00\x03\x00\x08\x00\x00\x00\x01\x05ab"  # PADDED, pad length 5 of 3
    assert peer.connection_error(bad) == E.PROTOCOL_ERROR


def test_6_2_headers_on_stream_0_is_protocol_error() -> None:
    """If a HEADERS frame is received whose Stream Identifier field is 0x00, the
    recipient MUST respond with a connection error of type PROTOCOL_ERROR."""
    block = b"\x82\x86\x84"
    bad = b"\x00\x00\x03\x01\x05\x00\x00\x00\x00" + block
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_2_headers_padding_too_long_is_protocol_error() -> None:
    """Padding that exceeds the size remaining for the field block fragment MUST be
    treated as a PROTOCOL_ERROR."""
    bad = b"\x00\x00\x02\x01\x0d\x00\x00\x00\x01\x09\x82"  # PADDED, pad 9 of 2
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_3_priority_on_stream_0_is_protocol_error() -> None:
    """If a PRIORITY frame is received with a stream identifier of 0x00, the recipient
    MUST respond with a connection error of type PROTOCOL_ERROR."""
    bad = b"\x00\x00\x05\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10"
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_3_priority_of_wrong_length_is_frame_size_error() -> None:
    """A PRIORITY frame with a length other than 5 octets MUST be treated as a stream
    error of type FRAME_SIZE_ERROR."""
    bad = b"\x00\x00\x04\x02\x00\x00\x00\x00\x01\x00\x00\x00\x00"
    assert Peer().stream_error(bad) == (1, E.FRAME_SIZE_ERROR)


def test_6_4_rst_stream_on_stream_0_is_protocol_error() -> None:
    """If a RST_STREAM frame is received with a stream identifier of 0x00, the recipient
    MUST treat this as a connection error of type PROTOCOL_ERROR."""
    bad = b"\x00\x00\x04\x03\x00\x00\x00\x00\x00\x00\x00\x00\x08"
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_4_rst_stream_of_wrong_length_is_frame_size_error() -> None:
    """A RST_STREAM frame with a length other than 4 octets MUST be treated as a
    connection error of type FRAME_SIZE_ERROR."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    bad = b"\x00\x00\x03\x03\x00\x00\x00\x00\x01\x00\x00\x08"
    assert peer.connection_error(bad) == E.FRAME_SIZE_ERROR


def test_6_5_settings_ack_with_payload_is_frame_size_error() -> None:
    """Receipt of a SETTINGS frame with the ACK flag set and a length field value other
    than 0 MUST be treated as a connection error of type FRAME_SIZE_ERROR."""
    bad = b"\x00\x00\x06\x04\x01\x00\x00\x00\x00\x00\x03\x00\x00\x00\x01"
    assert Peer().connection_error(bad) == E.FRAME_SIZE_ERROR


def test_6_5_settings_on_a_stream_is_protocol_error() -> None:
    """If an endpoint receives a SETTINGS frame whose Stream Identifier field is
    anything other than 0x00, the endpoint MUST respond with a connection error of type
    PROTOCOL_ERROR."""
    assert Peer().connection_error(b"\x00\x00\x00\x04\x00\x00\x00\x00\x01") == E.PROTOCOL_ERROR


def test_6_5_settings_length_not_multiple_of_6_is_frame_size_error() -> None:
    """A SETTINGS frame with a length other than a multiple of 6 octets MUST be treated
    as a connection error of type FRAME_SIZE_ERROR."""
    bad = b"\x00\x00\x03\x04\x00\x00\x00\x00\x00\x00\x03\x00"
    assert Peer().connection_error(bad) == E.FRAME_SIZE_ERROR


def test_6_5_2_enable_push_over_1_is_protocol_error() -> None:
    """Any value other than 0 or 1 [for SETTINGS_ENABLE_PUSH] MUST be treated as a
    connection error of type PROTOCOL_ERROR."""
    frame = SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 2})
    assert Peer().connection_error(frame) == E.PROTOCOL_ERROR


def test_6_5_2_initial_window_over_max_is_flow_control_error() -> None:
    """Values above the maximum flow-control window size of 2^31-1 MUST be treated as a
    connection error of type FLOW_CONTROL_ERROR."""
    frame = SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 2**31})
    assert Peer().connection_error(frame) == E.FLOW_CONTROL_ERROR


@pytest.mark.parametrize("value", [16383, 2**24])
def test_6_5_2_max_frame_size_out_of_range_is_protocol_error(value: int) -> None:
    """Values outside this range [2^14 to 2^24-1] MUST be treated as a connection error
    of type PROTOCOL_ERROR."""
    frame = SettingsFrame(0, settings={SettingCodes.MAX_FRAME_SIZE: value})
    assert Peer().connection_error(frame) == E.PROTOCOL_ERROR


def test_6_5_3_settings_are_acknowledged_and_unknown_ones_ignored() -> None:
    """Upon receiving a SETTINGS frame ... the recipient MUST immediately emit a
    SETTINGS frame with the ACK flag set; unsupported parameters MUST be ignored."""
    peer = Peer()
    peer.send(SettingsFrame(0, settings={0xEE: 1}))
    ack = peer.out()[-1]
    assert isinstance(ack, SettingsFrame) and "ACK" in ack.flags


def test_6_7_ping_is_answered_with_same_payload() -> None:
    """Receivers of a PING frame that does not include an ACK flag MUST send a PING
    frame with the ACK flag set in response, with an identical frame payload."""
    peer = Peer()
    peer.send(PingFrame(0, opaque_data=b"abcdefgh"))
    pong = peer.out()[-1]
    assert isinstance(pong, PingFrame) and "ACK" in pong.flags
    assert pong.opaque_data == b"abcdefgh"


def test_6_7_ping_on_a_stream_is_protocol_error() -> None:
    """If a PING frame is received with a Stream Identifier field value other than
    0x00, the recipient MUST respond with a connection error of type PROTOCOL_ERROR."""
    bad = b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"x" * 8
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_7_ping_of_wrong_length_is_frame_size_error() -> None:
    """Receipt of a PING frame with a length field value other than 8 MUST be treated
    as a connection error of type FRAME_SIZE_ERROR."""
    bad = b"\x00\x00\x06\x06\x00\x00\x00\x00\x00" + b"x" * 6
    assert Peer().connection_error(bad) == E.FRAME_SIZE_ERROR


def test_6_8_goaway_on_a_stream_is_protocol_error() -> None:
    """An endpoint MUST treat a GOAWAY frame with a stream identifier other than 0x00 as
    a connection error of type PROTOCOL_ERROR."""
    bad = b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\x00" * 8
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_9_window_update_of_0_on_connection_is_protocol_error() -> None:
    """A receiver MUST treat the receipt of a WINDOW_UPDATE frame with a flow-control
    window increment of 0 as a stream error of type PROTOCOL_ERROR; errors on the
    connection flow-control window MUST be treated as a connection error."""
    bad = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    assert Peer().connection_error(bad) == E.PROTOCOL_ERROR


def test_6_9_window_update_of_0_on_stream_is_stream_protocol_error() -> None:
    """(As above, on a stream: a stream error.)"""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    bad = b"\x00\x00\x04\x08\x00\x00\x00\x00\x01\x00\x00\x00\x00"
    assert peer.stream_error(bad) == (1, E.PROTOCOL_ERROR)


def test_6_9_window_update_of_wrong_length_is_frame_size_error() -> None:
    """A WINDOW_UPDATE frame with a length other than 4 octets MUST be treated as a
    connection error of type FRAME_SIZE_ERROR."""
    bad = b"\x00\x00\x03\x08\x00\x00\x00\x00\x00\x00\x00\x01"
    assert Peer().connection_error(bad) == E.FRAME_SIZE_ERROR


def test_6_9_1_connection_window_over_max_is_flow_control_error() -> None:
    """If a sender receives a WINDOW_UPDATE that causes a flow-control window to exceed
    this maximum, it MUST terminate ... with FLOW_CONTROL_ERROR (connection)."""
    frame = WindowUpdateFrame(0, window_increment=2**31 - 1)
    assert Peer().connection_error(frame) == E.FLOW_CONTROL_ERROR


def test_6_9_1_stream_window_over_max_is_flow_control_error() -> None:
    """(As above, on a stream: RST_STREAM with FLOW_CONTROL_ERROR.)"""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    frame = WindowUpdateFrame(1, window_increment=2**31 - 1)
    assert peer.stream_error(frame) == (1, E.FLOW_CONTROL_ERROR)


def test_6_9_1_data_over_the_window_is_flow_control_error() -> None:
    """A receiver MUST treat the receipt of [flow-controlled data beyond the window it
    advertised] as a connection error of type FLOW_CONTROL_ERROR."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    chunk = DataFrame(1, data=b"x" * 16384)
    assert peer.connection_error(*[chunk] * 5) == E.FLOW_CONTROL_ERROR


def test_6_9_2_initial_window_change_over_max_is_flow_control_error() -> None:
    """An endpoint MUST treat a change to SETTINGS_INITIAL_WINDOW_SIZE that causes any
    flow-control window to exceed the maximum size as a connection error of type
    FLOW_CONTROL_ERROR."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False), WindowUpdateFrame(1, window_increment=2**30))
    frame = SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    assert peer.connection_error(frame) == E.FLOW_CONTROL_ERROR


def test_6_10_continuation_without_headers_is_protocol_error() -> None:
    """A CONTINUATION frame MUST be preceded by a HEADERS, PUSH_PROMISE or CONTINUATION
    frame without the END_HEADERS flag set ... connection error PROTOCOL_ERROR."""
    peer = Peer()
    peer.send(peer.headers(1))
    cont = ContinuationFrame(1, flags=["END_HEADERS"])
    cont.data = peer.block([("x-a", "1")])
    assert peer.connection_error(cont) == E.PROTOCOL_ERROR


def test_6_10_continuation_on_stream_0_is_protocol_error() -> None:
    """If a CONTINUATION frame is received with a Stream Identifier field of 0x00, the
    recipient MUST respond with a connection error of type PROTOCOL_ERROR."""
    assert Peer().connection_error(b"\x00\x00\x00\x09\x04\x00\x00\x00\x00") == E.PROTOCOL_ERROR


def test_6_10_endless_continuation_is_bounded() -> None:
    """(CVE-2024-27316: a header block that never ends must not grow without bound;
    empty CONTINUATION frames count too.)"""
    peer = Peer()
    head = peer.headers(1)
    head.flags.discard("END_HEADERS")
    empty = ContinuationFrame(1).serialize()
    peer.send(head)
    with pytest.raises(engine.ProtocolError) as err:
        for _ in range(20000):
            peer.send(empty * 10)
            assert len(peer.conn._block) <= 1
    assert err.value.code == E.ENHANCE_YOUR_CALM


def test_8_4_push_promise_from_client_is_protocol_error() -> None:
    """A client cannot push ... A server MUST treat the receipt of a PUSH_PROMISE frame
    as a connection error of type PROTOCOL_ERROR."""
    frame = PushPromiseFrame(1, promised_stream_id=2, flags=["END_HEADERS"])
    assert Peer().connection_error(frame) == E.PROTOCOL_ERROR


# -- 8.1 messages, 8.2 fields, 8.3 control data -----------------------------------


def test_8_1_trailers_without_end_stream_is_protocol_error() -> None:
    """A HEADERS frame that ... carries trailers MUST also have END_STREAM set; anything
    else is malformed: a stream error of type PROTOCOL_ERROR."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    trailers = peer.headers(1, [("x-t", "1")], end_stream=False)
    assert peer.stream_error(trailers) == (1, E.PROTOCOL_ERROR)


@pytest.mark.parametrize("length,data", [("3", b"four"), ("5", b"four")])
def test_8_1_1_content_length_mismatch_is_protocol_error(length: str, data: bytes) -> None:
    """A request or response is also malformed if the value of a content-length header
    field does not equal the sum of the DATA frame payload lengths."""
    peer = Peer()
    peer.send(peer.headers(1, [*REQUEST, ("content-length", length)], end_stream=False))
    assert peer.stream_error(DataFrame(1, data=data, flags=["END_STREAM"])) == (
        1,
        E.PROTOCOL_ERROR,
    )


MALFORMED_FIELDS = {
    "uppercase-name": [(b"X-Upper", b"1")],
    "empty-name": [(b"", b"1")],
    "space-in-name": [(b"x a", b"1")],
    "colon-in-name": [(b"x:a", b"1")],
    "nul-in-name": [(b"x\x00a", b"1")],
    "del-in-name": [(b"x\x7fa", b"1")],
    "high-byte-in-name": [(b"x\xe9", b"1")],
    "crlf-in-value": [(b"x-a", b"a\r\ncontent-length: 0\r\n\r\nGET /smuggled HTTP/1.1")],
    "lf-in-value": [(b"x-a", b"a\nb")],
    "cr-in-value": [(b"x-a", b"a\rb")],
    "nul-in-value": [(b"x-a", b"a\x00b")],
    "leading-space": [(b"x-a", b" a")],
    "trailing-tab": [(b"x-a", b"a\t")],
    "connection": [(b"connection", b"close")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "keep-alive": [(b"keep-alive", b"1")],
    "upgrade": [(b"upgrade", b"h2c")],
    "te-gzip": [(b"te", b"gzip")],
    "two-hosts": [(b"host", b"a"), (b"host", b"b")],
}


@pytest.mark.parametrize("fields", MALFORMED_FIELDS.values(), ids=MALFORMED_FIELDS.keys())
def test_8_2_malformed_request_field_is_protocol_error(fields: list) -> None:
    """8.2.1/8.2.2: a field name MUST NOT contain 0x00-0x20, 0x41-0x5a, 0x7f-0xff or a
    colon; a field value MUST NOT contain NUL, LF or CR nor start or end with SP/HTAB;
    connection-specific fields, and te other than "trailers", make it malformed
    (stream error of type PROTOCOL_ERROR)."""
    peer = Peer()
    raw = [(n.encode(), v.encode()) for n, v in REQUEST]
    assert peer.stream_error(raw_headers(1, peer.block([*raw, *fields]))) == (1, 1)


@pytest.mark.parametrize("fields", MALFORMED_FIELDS.values(), ids=MALFORMED_FIELDS.keys())
def test_8_2_malformed_trailer_field_is_protocol_error(fields: list) -> None:
    """(The same rules for trailers, RFC 9113 8.1: a trailer section is a field block.)"""
    if fields[0][0] == b"host":
        pytest.skip("host in trailers is not a framing field")
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    events = peer.send(raw_headers(1, peer.block(fields)))
    assert not [e for e in events if isinstance(e, engine.TrailersReceived)]
    reset = peer.out()[-1]
    assert isinstance(reset, RstStreamFrame) and reset.error_code == E.PROTOCOL_ERROR


def test_8_2_every_byte_in_a_value_is_refused_exactly_when_it_is_a_control() -> None:
    """(Each of the 256 byte values inside a request field's value, in a request and in a
    response: refused exactly for the control characters other than HTAB, RFC 9110 5.5,
    which is stricter than RFC 9113's NUL, CR and LF.)"""
    raw = [(n.encode(), v.encode()) for n, v in REQUEST]
    for byte in range(256):
        value = b"a" + bytes([byte]) + b"b"
        control = (byte < 32 and byte != 9) or byte == 127
        peer = Peer()
        events = peer.send(raw_headers(1, peer.block([*raw, (b"x-a", value)])))
        accepted = [e for e in events if isinstance(e, engine.RequestReceived)]
        assert bool(accepted) is not control, byte
        response = [(b":status", b"200"), (b"x-a", value)]
        try:
            h2fields.response_length(response)
        except h2fields.Malformed:
            assert control, byte
        else:
            assert not control, byte


def test_8_2_names_learned_as_tokens_stay_bounded_and_checked() -> None:
    """(A token name outside the common set is matched once and remembered; a long one
    or one past the bound is matched every time; an invalid one is never remembered.)"""
    raw = [(n.encode(), v.encode()) for n, v in REQUEST]
    long_name = b"x" * (h2fields._LEARNED_NAME_MAX + 1)
    for name in (b"x-learned-once", long_name):
        for _ in range(2):
            assert h2fields.request_length([*raw, (name, b"1")]) == -1
    assert b"x-learned-once" in h2fields._NAMES and long_name not in h2fields._NAMES
    with pytest.raises(h2fields.Malformed):
        h2fields.request_length([*raw, (b"x y", b"1")])
    assert b"x y" not in h2fields._NAMES
    with pytest.raises(h2fields.Malformed):
        h2fields.response_length([(b":status", b"200"), (b":path", b"/")])


def test_8_2_pseudo_header_in_trailers_is_protocol_error() -> None:
    """Pseudo-header fields MUST NOT appear in a trailer section."""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    assert peer.stream_error(peer.headers(1, [(":path", "/x")])) == (1, E.PROTOCOL_ERROR)


def _req(**changes: str | None) -> list[tuple[str, str]]:
    fields = dict(REQUEST)
    for name, value in changes.items():
        key = ":" + name
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    return list(fields.items())


MALFORMED_REQUESTS = {
    "no-method": _req(method=None),
    "no-scheme": _req(scheme=None),
    "no-path": _req(path=None),
    "empty-path": _req(path=""),
    "path-not-origin-form": _req(path="x/y"),
    "star-path-for-get": _req(path="*"),
    "space-in-path": _req(path="/a b"),
    "crlf-in-path": _req(path="/a\r\nx: y"),
    "method-not-token": _req(method="GE T"),
    "crlf-in-method": _req(method="GET\r\n"),
    "scheme-invalid": _req(scheme="1http"),
    "authority-with-userinfo": _req(authority="u@svc"),
    "authority-with-space": _req(authority="s vc"),
    "no-authority-no-host": _req(authority=None),
    "unknown-pseudo": [*REQUEST, (":foo", "1")],
    "response-pseudo": [*REQUEST, (":status", "200")],
    "repeated-pseudo": [*REQUEST, (":path", "/again")],
    "pseudo-after-regular": [("x-a", "1"), *REQUEST],
}


@pytest.mark.parametrize("headers", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_8_3_malformed_request_pseudo_headers_are_protocol_error(headers: list) -> None:
    """8.3/8.3.1: pseudo-headers only those defined, once, before regular fields;
    :method, :scheme and :path present (CONNECT aside); :path not empty, origin-form or
    '*' for OPTIONS; else malformed: a stream error of type PROTOCOL_ERROR."""
    peer = Peer()
    assert peer.stream_error(raw_headers(1, peer.block(headers))) == (1, E.PROTOCOL_ERROR)


def test_8_3_1_options_star_and_host_without_authority_are_served() -> None:
    """(What the rules allow: '*' for OPTIONS, a host field instead of :authority.)"""
    peer = Peer()
    events = peer.send(raw_headers(1, peer.block([*_req(method="OPTIONS", path="*")])))
    assert isinstance(events[0], engine.RequestReceived)
    events = peer.send(raw_headers(3, peer.block([*_req(authority=None), ("host", "svc")])))
    assert isinstance(events[0], engine.RequestReceived)


# -- client side: responses (the engine as the upstream pool's client) -----------------


def _client() -> tuple[engine.H2Connection, Encoder]:
    conn = engine.H2Connection(client_side=True)
    conn.initiate_connection()
    conn.receive_data(SettingsFrame(0).serialize())
    conn.send_headers(1, [(n.encode(), v.encode()) for n, v in REQUEST], end_stream=True)
    conn.data_to_send()
    return conn, Encoder()


BAD_RESPONSES = {
    "no-status": [(b"x-a", b"1")],
    "status-not-3-digits": [(b":status", b"20")],
    "status-not-digits": [(b":status", b"2x0")],
    "request-pseudo": [(b":status", b"200"), (b":path", b"/")],
    "crlf-in-value": [(b":status", b"200"), (b"x-a", b"a\r\n\r\nHTTP/1.1 200 OK")],
    "uppercase-name": [(b":status", b"200"), (b"X-A", b"1")],
    "connection": [(b":status", b"200"), (b"connection", b"close")],
}


@pytest.mark.parametrize("headers", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_8_3_2_malformed_response_is_protocol_error(headers: list) -> None:
    """A response ... MUST include :status; pseudo-headers for requests MUST NOT appear
    in responses; the field rules of 8.2 hold: else a stream error PROTOCOL_ERROR."""
    conn, encoder = _client()
    events: list[Any] = conn.receive_data(raw_headers(1, encoder.encode(headers)).serialize())
    assert [type(e) for e in events] == [engine.StreamReset]
    assert events[0].error_code == E.PROTOCOL_ERROR and not events[0].remote


def test_8_1_malformed_response_trailer_is_protocol_error() -> None:
    """(Response trailers obey 8.2 too: a forged second response in a trailer value.)"""
    conn, encoder = _client()
    head = HeadersFrame(1, flags=["END_HEADERS"])
    head.data = encoder.encode([(b":status", b"200")])
    trailers = raw_headers(1, encoder.encode([(b"x-t", b"a\r\n\r\nHTTP/1.1 200 OK\r\n")]))
    events = conn.receive_data(head.serialize() + trailers.serialize())
    assert [type(e) for e in events] == [engine.ResponseReceived, engine.StreamReset]


def test_6_5_2_server_enabling_push_is_protocol_error() -> None:
    """A client MUST treat receipt of a SETTINGS frame with SETTINGS_ENABLE_PUSH set to
    1 as a connection error of type PROTOCOL_ERROR."""
    conn = engine.H2Connection(client_side=True)
    conn.initiate_connection()
    with pytest.raises(engine.ProtocolError) as err:
        conn.receive_data(SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 1}).serialize())
    assert err.value.code == E.PROTOCOL_ERROR


# -- RFC 7541 HPACK ------------------------------------------------------------------


def test_7541_4_2_table_size_update_after_a_field_is_compression_error() -> None:
    """This dynamic table size update MUST occur at the beginning of the first header
    block following the change ... [elsewhere it is] a decoding error."""
    peer = Peer()
    block = peer.block(REQUEST) + b"\x20"
    assert peer.connection_error(raw_headers(1, block)) == E.COMPRESSION_ERROR


def test_7541_4_2_table_size_update_at_start_is_accepted() -> None:
    """(At the beginning of the block it is allowed.)"""
    peer = Peer()
    events = peer.send(raw_headers(1, b"\x3f\xe1\x1f" + peer.block(REQUEST)))
    assert isinstance(events[0], engine.RequestReceived)


def test_7541_6_3_table_size_update_over_the_limit_is_compression_error() -> None:
    """The new maximum size MUST be lower than or equal to the limit [SETTINGS]; a value
    that exceeds this limit MUST be treated as a decoding error."""
    block = b"\x3f\xe1\x3f" + b"\x82\x86\x84"
    assert Peer().connection_error(raw_headers(1, block)) == E.COMPRESSION_ERROR


# :method GET, :scheme http, :authority literal "svc", then :path with a Huffman value.
_HEAD = b"\x82\x86\x41\x03svc\x04"


@pytest.mark.parametrize(
    "string",
    [b"\x81\x60", b"\x82\x63\xff", b"\x84\xff\xff\xff\xff"],
    ids=["padded-with-zeros", "padding-over-7-bits", "contains-eos"],
)
def test_7541_5_2_bad_huffman_padding_is_compression_error(string: bytes) -> None:
    """Padding strictly longer than 7 bits MUST be treated as a decoding error; padding
    not corresponding to the most significant bits of the code for the EOS symbol MUST
    be treated as a decoding error; a Huffman-encoded string literal containing the
    EOS symbol MUST be treated as a decoding error."""
    assert Peer().connection_error(raw_headers(1, _HEAD + string)) == E.COMPRESSION_ERROR


def test_7541_5_2_huffman_padded_with_ones_is_accepted() -> None:
    """(The valid padding: '/' is 6 bits, then two one bits.)"""
    events = Peer().send(raw_headers(1, _HEAD + b"\x81\x63"))
    assert isinstance(events[0], engine.RequestReceived)
    assert (b":path", b"/") in events[0].headers


@pytest.mark.parametrize("block", [b"\x80", b"\xbf"], ids=["index-0", "index-past-tables"])
def test_7541_6_1_invalid_index_is_compression_error(block: bytes) -> None:
    """The index value of 0 is not used. It MUST be treated as a decoding error; indices
    beyond the tables MUST be treated as a decoding error (2.3.3)."""
    assert Peer().connection_error(raw_headers(1, block)) == E.COMPRESSION_ERROR


def test_7541_6_2_literal_name_index_past_tables_is_compression_error() -> None:
    """(A literal field whose name index is beyond both tables, 2.3.3.)"""
    assert Peer().connection_error(raw_headers(1, b"\x7e\x01a")) == E.COMPRESSION_ERROR


def test_7541_4_huffman_names_and_indexed_repeats_are_checked_once() -> None:
    """(A block of hpack's Encoder, Huffman names and values, then the same head again
    as indexed fields: both accepted, the dynamic table followed.)"""
    peer = Peer()
    fields = [*REQUEST, ("x-custom-name", "some value with spaces")]
    first: list[Any] = peer.send(raw_headers(1, peer.block(fields)))
    second: list[Any] = peer.send(raw_headers(3, peer.block(fields)))
    assert first[0].headers == second[0].headers
    assert (b"x-custom-name", b"some value with spaces") in second[0].headers


def test_7541_5_2_a_passed_block_is_remembered_and_a_bad_one_never() -> None:
    """(The walk's verdict depends on the block's bytes alone: a small block that passed
    is not walked again, on any connection; a refused one is refused every time; the
    memo stays within its bound.)"""
    good, bad = _HEAD + b"\x81\x63", _HEAD + b"\x81\x60"
    h2fields.HPACK_PASSED.clear()
    Peer().send(raw_headers(1, good))
    assert good in h2fields.HPACK_PASSED
    for _ in range(2):
        assert Peer().connection_error(raw_headers(1, bad)) == E.COMPRESSION_ERROR
        assert bad not in h2fields.HPACK_PASSED
    for i in range(h2fields.HPACK_PASSED_MAX):
        h2fields.HPACK_PASSED[i.to_bytes(4, "big")] = None  # filled by an attacker
    other = _HEAD + b"\x83\x60\x71\xff"  # "/ab", padded with seven ones
    Peer().send(raw_headers(1, other))
    assert list(h2fields.HPACK_PASSED) == [other]


# -- what a connection may make the engine hold (issue 15, finding 9) ----------------


def test_memory_a_frame_trickled_a_byte_at_a_time_is_held_once() -> None:
    """(A 16 KiB DATA frame sent one byte per read: the engine holds at most the frame,
    in one buffer, and delivers it whole.)"""
    peer = Peer()
    peer.send(peer.headers(1, end_stream=False))
    wire = DataFrame(1, data=b"x" * 16384).serialize()
    events: list[Any] = []
    for i in range(len(wire)):
        events += peer.conn.receive_data(wire[i : i + 1])
        assert len(peer.conn._pending) <= len(wire)
    assert [len(e.data) for e in events] == [16384]
    assert not peer.conn._pending


def test_memory_tracked_state_stays_bounded_under_hostile_frames() -> None:
    """(Streams half-open with data, resets, self-dependent HEADERS, DATA on closed
    streams, SETTINGS churn: what the engine tracks stays within its limits.)"""
    peer = Peer(**{str(SettingCodes.MAX_CONCURRENT_STREAMS.value): 10})
    stream_id = 1
    for _ in range(300):
        head = peer.headers(stream_id, end_stream=False)  # encoded in the order sent
        dependent = peer.headers(stream_id + 2, depends_on=stream_id + 2, stream_weight=1)
        dependent.flags.add("PRIORITY")
        peer.send(
            head,
            DataFrame(stream_id, data=b"x" * 100),
            dependent,
            DataFrame(stream_id + 2, data=b"y"),
            SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: stream_id}),
        )
        stream_id += 4
        peer.out()
    conn = peer.conn
    assert len(conn.streams) <= 10
    assert len(conn._reset_sent) <= engine.RESET_MEMORY
    assert not conn._pending and not conn._block
