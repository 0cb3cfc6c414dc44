"""HTTP/2 conformance against a live listener: a subset of tests/unit/test_h2_conformance.py
sent as raw frames to a real sidecar's inbound listener (127.0.0.1, port 0), asserting
the GOAWAY or RST_STREAM code RFC 9113 / RFC 7541 names and that the app received
nothing (its own call count)."""

from __future__ import annotations

import socket

import pytest
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.hostile.h2raw import COMPRESSION_ERROR, PROTOCOL_ERROR, RawH2
from tests.hostile.wire import app_calls
from tests.integration.conftest import Proc, Sidecar

pytestmark = pytest.mark.integration

STREAM_CLOSED = 0x5


def _reset_code(client: RawH2, stream_id: int) -> int | None:
    for frame in client.frames(timeout=2):
        if isinstance(frame, RstStreamFrame) and frame.stream_id == stream_id:
            return int(frame.error_code)
        if isinstance(frame, GoAwayFrame):
            return int(frame.error_code)
    return None


def test_3_5_invalid_preface_gets_goaway_protocol_error(target: tuple[Proc, Sidecar]) -> None:
    """3.5: a preface that starts like one and diverges: GOAWAY PROTOCOL_ERROR, then
    the connection closes."""
    _, sidecar = target
    sock = socket.create_connection(("127.0.0.1", sidecar.ports["inbound"]), timeout=5)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    # Our SETTINGS, then GOAWAY (type 7) whose last 4 bytes are the code.
    assert data[-17 + 3] == 7 and int.from_bytes(data[-4:], "big") == PROTOCOL_ERROR


FIELDS = {
    "crlf-in-value": [("x-a", "a\r\ncontent-length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nx: z")],
    "nul-in-name": [("x\x00a", "1")],
    "space-in-name": [("x a", "1")],
    "leading-space": [("x-a", " 1")],
}


@pytest.mark.parametrize("extra", FIELDS.values(), ids=FIELDS.keys())
def test_8_2_malformed_field_is_reset_and_reaches_no_app(
    target: tuple[Proc, Sidecar], extra: list[tuple[str, str]]
) -> None:
    """8.2.1: a malformed field: RST_STREAM PROTOCOL_ERROR; the app sees nothing."""
    app, sidecar = target
    before = app_calls(app)
    client = RawH2(sidecar.ports["inbound"])
    frame = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    frame.data = client.headers_block(1, "/x", extra)
    client.send(frame)
    assert _reset_code(client, 1) == PROTOCOL_ERROR
    client.close()
    assert app_calls(app) == before


@pytest.mark.parametrize("path", ["", "/a\r\nx: y", "/a b"], ids=["empty", "crlf", "space"])
def test_8_3_1_bad_path_is_reset_and_reaches_no_app(
    target: tuple[Proc, Sidecar], path: str
) -> None:
    """8.3.1: :path empty or not a valid origin-form: a malformed request."""
    app, sidecar = target
    before = app_calls(app)
    client = RawH2(sidecar.ports["inbound"])
    client.send(client.request(1, path))
    assert _reset_code(client, 1) == PROTOCOL_ERROR
    client.close()
    assert app_calls(app) == before


def test_5_3_1_self_dependent_headers_is_not_answered(target: tuple[Proc, Sidecar]) -> None:
    """5.3.1: a stream cannot depend on itself: PROTOCOL_ERROR, and no answer."""
    app, sidecar = target
    before = app_calls(app)
    client = RawH2(sidecar.ports["inbound"])
    frame = client.request(1)
    frame.flags.add("PRIORITY")
    frame.depends_on, frame.stream_weight = 1, 16
    client.send(frame, PriorityFrame(3, depends_on=3))
    codes = [(f.stream_id, f.error_code) for f in client.frames(2) if isinstance(f, RstStreamFrame)]
    client.close()
    assert (1, PROTOCOL_ERROR) in codes and (3, PROTOCOL_ERROR) in codes
    assert app_calls(app) == before


def test_5_1_data_after_rst_stream_is_stream_closed(target: tuple[Proc, Sidecar]) -> None:
    """5.1: after the peer's RST_STREAM, DATA on the stream is STREAM_CLOSED."""
    _, sidecar = target
    client = RawH2(sidecar.ports["inbound"])
    client.send(client.request(1, end_stream=False), client.reset(1), DataFrame(1, data=b"x"))
    assert _reset_code(client, 1) == STREAM_CLOSED
    client.close()


def test_7541_4_2_size_update_after_a_field_is_compression_error(
    target: tuple[Proc, Sidecar],
) -> None:
    """RFC 7541 4.2: a dynamic table size update after a field: COMPRESSION_ERROR."""
    _, sidecar = target
    client = RawH2(sidecar.ports["inbound"])
    frame = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    frame.data = client.headers_block(1) + b"\x20"
    client.send(SettingsFrame(0), frame)
    goaway = client.goaway(timeout=3)
    client.close()
    assert goaway is not None and goaway.error_code == COMPRESSION_ERROR
