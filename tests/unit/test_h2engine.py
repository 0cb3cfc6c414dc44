"""The HTTP/2 engine against h2 (an independent implementation) as the peer, bytes only."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hyperframe.frame import Frame as HFrame

from sidecar.proto import h2engine as engine
from sidecar.proto.h2engine import ErrorCodes, SettingCodes

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/p?q=1"),
    (b":authority", b"svc"),
]


def h2_peer(client_side: bool) -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    peer = h2.connection.H2Connection(config=config)
    peer.initiate_connection()
    return peer


def frames(data: bytes) -> list[HFrame]:
    out = []
    while data:
        frame, length = HFrame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


def pump(ours: engine.H2Connection, peer: h2.connection.H2Connection) -> tuple[list, list]:
    """Exchange bytes until both sides are quiet; returns (our events, the peer's)."""
    mine: list = []
    theirs: list = []
    for _ in range(20):
        a, b = ours.data_to_send(), peer.data_to_send()
        if not a and not b:
            break
        if a:
            theirs += peer.receive_data(a)
        if b:
            mine += ours.receive_data(b)
    return mine, theirs


def server_with_client(
    settings: dict[int, int] | None = None,
) -> tuple[engine.H2Connection, h2.connection.H2Connection]:
    ours = engine.H2Connection(client_side=False, settings=settings)
    ours.initiate_connection()
    peer = h2_peer(client_side=True)
    pump(ours, peer)
    return ours, peer


def preface_and_settings() -> bytes:
    return engine.PREFACE + SettingsFrame(0).serialize()


def test_request_and_response_with_body_and_trailers_both_ways() -> None:
    ours, peer = server_with_client()
    peer.send_headers(1, [*REQUEST, (b"content-length", b"5")])
    peer.send_data(1, b"hello", end_stream=True)
    mine, _ = pump(ours, peer)
    kinds = [type(e) for e in mine]
    assert kinds == [engine.RequestReceived, engine.DataReceived, engine.StreamEnded]
    request = mine[0]
    assert request.headers[:4] == REQUEST and not request.stream_ended
    assert mine[1].data == b"hello" and mine[1].flow_controlled_length == 5
    ours.send_headers(1, [(b":status", b"200"), (b"x-a", b"b")])
    ours.send_data(1, b"world")
    ours.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    _, theirs = pump(ours, peer)
    got = {type(e): e for e in theirs}
    assert got[h2.events.ResponseReceived].headers == [(b":status", b"200"), (b"x-a", b"b")]
    assert got[h2.events.DataReceived].data == b"world"
    assert got[h2.events.TrailersReceived].headers == [(b"grpc-status", b"0")]
    assert h2.events.StreamEnded in got
    assert 1 not in ours.streams  # both sides ended: forgotten


def test_events_compare_by_value_and_show_their_fields() -> None:
    ours, peer = server_with_client()
    peer.send_headers(1, REQUEST, end_stream=True)
    mine, _ = pump(ours, peer)
    assert mine == [engine.RequestReceived(1, REQUEST, True), engine.StreamEnded(1)]
    assert repr(engine.StreamReset(3, 8)) == (
        "StreamReset(stream_id=3, error_code=8, remote=True, reason='')"
    )
    assert engine.PingReceived() == engine.PingReceived()
    # A response head is not a request head, whatever its fields.
    response: object = engine.ResponseReceived(1, [], True)
    assert response != engine.RequestReceived(1, [], True)


def test_every_event_type_is_listed_for_dispatch_tables() -> None:
    made = {
        value
        for value in vars(engine).values()
        if isinstance(value, type) and issubclass(value, engine.Event) and value is not engine.Event
    }
    assert made == set(engine.EVENT_TYPES)
    for kind in engine.EVENT_TYPES:
        assert kind.__dictoffset__ == 0  # slotted: no per-event __dict__


def test_our_client_against_an_h2_server() -> None:
    ours = engine.H2Connection(client_side=True, settings={SettingCodes.ENABLE_PUSH: 0})
    ours.initiate_connection()
    peer = h2_peer(client_side=False)
    pump(ours, peer)
    stream_id = ours.get_next_available_stream_id()
    ours.send_headers(stream_id, REQUEST, end_stream=True)
    assert ours.get_next_available_stream_id() == stream_id + 2
    _, theirs = pump(ours, peer)
    assert [type(e) for e in theirs][:2] == [h2.events.RequestReceived, h2.events.StreamEnded]
    peer.send_headers(stream_id, [(b":status", b"100")])  # informational: skipped
    peer.send_headers(stream_id, [(b":status", b"204")], end_stream=True)
    mine, _ = pump(ours, peer)
    assert [type(e) for e in mine] == [engine.ResponseReceived, engine.StreamEnded]
    assert mine[0].headers == [(b":status", b"204")] and mine[0].stream_ended


def test_header_blocks_over_a_frame_are_split_and_reassembled() -> None:
    ours, peer = server_with_client()
    big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(40)]  # ~40 KB, > 16 KiB frames
    peer.send_headers(1, [*REQUEST, *big], end_stream=True)
    raw = peer.data_to_send()
    assert any(isinstance(f, ContinuationFrame) for f in frames(raw))
    mine: list[Any] = ours.receive_data(raw)
    assert mine[0].headers[4:] == big
    ours.send_headers(1, [(b":status", b"200"), *big], end_stream=True)
    out = ours.data_to_send()
    assert [type(f) for f in frames(out)].count(ContinuationFrame) >= 2
    theirs: list[Any] = peer.receive_data(out)
    assert theirs[0].headers[1:] == big


def test_a_header_block_interrupted_by_another_frame_is_a_connection_error() -> None:
    ours, _ = server_with_client()
    head = HeadersFrame(1)
    head.data = engine._Encoder().encode([(n, v, False) for n, v in REQUEST])
    with pytest.raises(engine.ProtocolError):
        ours.receive_data(head.serialize() + WindowUpdateFrame(0, window_increment=1).serialize())
    assert isinstance(frames(ours.data_to_send())[-1], GoAwayFrame)


def test_undecodable_header_block_is_a_compression_error_not_a_crash() -> None:
    ours, _ = server_with_client()
    head = HeadersFrame(1, flags=["END_HEADERS"])
    head.data = b"\xff\xff\xff"  # jh2's compiled decoder panics on this
    with pytest.raises(engine.ProtocolError) as err:
        ours.receive_data(head.serialize())
    assert err.value.code == ErrorCodes.COMPRESSION_ERROR
    goaway = frames(ours.data_to_send())[-1]
    assert isinstance(goaway, GoAwayFrame) and goaway.error_code == ErrorCodes.COMPRESSION_ERROR


@pytest.mark.parametrize(
    "headers",
    [
        [*REQUEST, (b"X-Upper", b"1")],
        [*REQUEST, (b"connection", b"close")],
        [*REQUEST, (b"te", b"gzip")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],  # no :path
        [(b"x-a", b"1"), *REQUEST],  # pseudo-header after a regular one
        [*REQUEST, (b":path", b"/again")],
    ],
)
def test_malformed_requests_are_reset_and_never_reported(headers: list) -> None:
    ours, _ = server_with_client()
    head = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    head.data = engine._Encoder().encode([(n, v, False) for n, v in headers])
    events: list[Any] = ours.receive_data(head.serialize())
    # Never announced as a request: only the reset we sent, with why.
    assert [(type(e), e.remote) for e in events] == [(engine.StreamReset, False)]
    assert events[0].reason
    reset = frames(ours.data_to_send())[-1]
    assert isinstance(reset, RstStreamFrame) and reset.error_code == ErrorCodes.PROTOCOL_ERROR


def test_body_longer_or_shorter_than_content_length_is_reset() -> None:
    ours, peer = server_with_client()
    peer.send_headers(1, [*REQUEST, (b"content-length", b"3")])
    pump(ours, peer)
    events: list[Any] = ours.receive_data(
        DataFrame(1, data=b"four", flags=["END_STREAM"]).serialize()
    )
    assert [type(e) for e in events] == [engine.StreamReset]
    assert events[0].error_code == ErrorCodes.PROTOCOL_ERROR and not events[0].remote
    head = HeadersFrame(3, flags=["END_HEADERS", "END_STREAM"])
    head.data = engine._Encoder().encode(
        [(n, v, False) for n, v in [*REQUEST, (b"content-length", b"3")]]
    )
    events = ours.receive_data(head.serialize())  # never announced: reset at once
    assert [type(e) for e in events] == [engine.StreamReset]
    reset = frames(ours.data_to_send())[-1]
    assert isinstance(reset, RstStreamFrame) and reset.stream_id == 3


def test_overrunning_the_connection_window_is_a_flow_control_error() -> None:
    ours = engine.H2Connection(client_side=False)
    ours.initiate_connection()
    ours.receive_data(preface_and_settings())
    head = HeadersFrame(1, flags=["END_HEADERS"])
    head.data = engine._Encoder().encode([(n, v, False) for n, v in REQUEST])
    ours.receive_data(head.serialize())
    chunk = DataFrame(1, data=b"x" * 16384).serialize()
    with pytest.raises(engine.ProtocolError) as err:
        ours.receive_data(chunk * 5)  # 80 KiB against the 64 KiB connection window
    assert err.value.code == ErrorCodes.FLOW_CONTROL_ERROR


def test_window_updates_are_batched_at_half_the_window() -> None:
    ours, peer = server_with_client()
    peer.send_headers(1, REQUEST)
    peer.send_data(1, b"x" * 16384)
    pump(ours, peer)
    ours.acknowledge_received_data(16384, 1)
    assert ours.data_to_send() == b""  # a quarter of the stream window: nothing yet
    peer.send_data(1, b"x" * 16384)
    pump(ours, peer)
    ours.acknowledge_received_data(16384, 1)
    updates = [f for f in frames(ours.data_to_send()) if isinstance(f, WindowUpdateFrame)]
    # Half of the 64 KiB connection window and of the stream's: one update each.
    assert [(u.stream_id, u.window_increment) for u in updates] == [(0, 32768), (1, 32768)]


def test_peer_settings_change_open_stream_windows() -> None:
    ours, peer = server_with_client()
    peer.send_headers(1, REQUEST)
    pump(ours, peer)
    assert ours.local_flow_control_window(1) == 65535
    ours.receive_data(
        SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000}).serialize()
    )
    assert ours.local_flow_control_window(1) == 1000


def test_stream_ids_must_grow() -> None:
    ours, _ = server_with_client()
    enc = engine._Encoder()

    def head(stream_id: int) -> bytes:
        frame = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM"])
        frame.data = enc.encode([(n, v, False) for n, v in REQUEST])
        return frame.serialize()

    assert len(ours.receive_data(head(5))) == 2
    with pytest.raises(engine.ProtocolError):
        ours.receive_data(head(3))


def test_streams_over_max_concurrent_are_refused() -> None:
    ours, _ = server_with_client({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    enc = engine._Encoder()
    wire = b""
    for stream_id in (1, 3, 5):
        frame = HeadersFrame(stream_id, flags=["END_HEADERS"])
        frame.data = enc.encode([(n, v, False) for n, v in REQUEST])
        wire += frame.serialize()
    events = ours.receive_data(wire)
    assert [e.stream_id for e in events if isinstance(e, engine.RequestReceived)] == [1, 3]
    reset = frames(ours.data_to_send())[-1]
    assert isinstance(reset, RstStreamFrame)
    assert (reset.stream_id, reset.error_code) == (5, ErrorCodes.REFUSED_STREAM)


def test_bad_preface_and_missing_settings_are_connection_errors() -> None:
    ours = engine.H2Connection(client_side=False)
    with pytest.raises(engine.ProtocolError):
        ours.receive_data(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10)
    ours = engine.H2Connection(client_side=False)
    with pytest.raises(engine.ProtocolError):
        ours.receive_data(engine.PREFACE + WindowUpdateFrame(0, window_increment=1).serialize())


def test_padded_frames_and_bytes_split_anywhere() -> None:
    ours, _ = server_with_client()
    head = HeadersFrame(1, flags=["END_HEADERS"])
    head.data = engine._Encoder().encode([(n, v, False) for n, v in REQUEST])
    head.flags.add("PADDED")
    head.pad_length = 7
    data = DataFrame(1, data=b"abc", flags=["END_STREAM", "PADDED"])
    data.pad_length = 4
    wire = head.serialize() + data.serialize()
    events: list[Any] = []
    for i in range(len(wire)):  # one byte at a time
        events += ours.receive_data(wire[i : i + 1])
    assert [type(e) for e in events] == [
        engine.RequestReceived,
        engine.DataReceived,
        engine.StreamEnded,
    ]
    assert events[1].data == b"abc" and events[1].flow_controlled_length == 3 + 4 + 1


def test_goaway_leaves_streams_below_it_running() -> None:
    ours = engine.H2Connection(client_side=True)
    ours.initiate_connection()
    peer = h2_peer(client_side=False)
    pump(ours, peer)
    ours.send_headers(1, REQUEST, end_stream=True)
    ours.send_headers(3, REQUEST, end_stream=True)
    pump(ours, peer)
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 1
    events: list[Any] = ours.receive_data(goaway.serialize())
    assert [(type(e), e.last_stream_id) for e in events] == [(engine.ConnectionTerminated, 1)]
    peer.send_headers(1, [(b":status", b"200")], end_stream=True)
    mine, _ = pump(ours, peer)
    assert [type(e) for e in mine] == [engine.ResponseReceived, engine.StreamEnded]
