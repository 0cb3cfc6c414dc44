"""Malformed HTTP/2 requests against a live sidecar (127.0.0.1, port 0), field by field:
raw HPACK literals (no encoder in the way) in raw frames over a plain socket. Beside
tests/hostile/test_h2_conformance_live.py, each refused request here is followed by a
valid one on the same connection, so a case asserts three things: RST_STREAM with the
code RFC 9113 names, the connection still serves, and the echo app's own counter saw
only the valid call (the refused one never reached it, not even split in two). Also on
the outbound listener, for trailers, and for RFC 7541 5.2 Huffman padding.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.hostile.h2raw import split_frames
from tests.hostile.wire import app_calls
from tests.integration.conftest import Proc, Sidecar

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR, STREAM_CLOSED, COMPRESSION_ERROR = 0x1, 0x5, 0x9

AUTHORITY = (b":authority", b"inventory")
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"), AUTHORITY]


def literal(name: bytes, value: bytes) -> bytes:
    """One HPACK literal field without indexing, new name, no Huffman (RFC 7541 6.2.2):
    the bytes go on the wire exactly as given, whatever the encoder would refuse."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def block(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(literal(name, value) for name, value in fields)


def headers(stream_id: int, data: bytes, *flags: str) -> HeadersFrame:
    frame = HeadersFrame(stream_id)
    frame.data = data
    frame.flags.add("END_HEADERS")
    for flag in flags:
        frame.flags.add(flag)
    return frame


class Conn:
    """A raw HTTP/2 connection: preface and SETTINGS sent, frames read until a predicate
    holds, the server closes, or the deadline passes (never sleep-and-hope)."""

    def __init__(self, port: int, preface: bytes = PREFACE + SettingsFrame(0).serialize()) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""
        self.frames: list[Frame] = []
        self.closed = False
        self.sock.sendall(preface)

    def send(self, *frames: Frame | bytes) -> None:
        self.sock.sendall(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def until(self, done: Callable[[Frame], bool], timeout: float = 5.0) -> Frame | None:
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for frame in self.frames[checked:]:
                if done(frame):
                    return frame
            checked = len(self.frames)
            if self.closed or time.monotonic() >= deadline:
                return None
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                continue
            self.buffer = split_frames(self.buffer + chunk, self.frames)

    def goaway(self) -> GoAwayFrame | None:
        frame = self.until(lambda f: isinstance(f, GoAwayFrame))
        return frame if isinstance(frame, GoAwayFrame) else None

    def reset(self, stream_id: int) -> RstStreamFrame | None:
        frame = self.until(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == stream_id)
        return frame if isinstance(frame, RstStreamFrame) else None

    def answered(self, stream_id: int) -> bool:
        return any(isinstance(f, HeadersFrame) and f.stream_id == stream_id for f in self.frames)

    def wait_answer(self, stream_id: int) -> bool:
        frame = self.until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == stream_id)
        return frame is not None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(target: tuple[Proc, Sidecar]) -> Iterator[Conn]:
    c = Conn(target[1].ports["inbound"])
    try:
        yield c
    finally:
        c.close()


def _refused_then_served(target: tuple[Proc, Sidecar], conn: Conn, bad: HeadersFrame) -> int:
    """Send `bad` on stream 1 and a valid request on stream 3; return stream 1's
    RST_STREAM code once stream 3 is answered, having checked the app saw one call."""
    app, _ = target
    before = app_calls(app)
    conn.send(bad, headers(3, block(REQUEST), "END_STREAM"))
    rst = conn.reset(1)
    assert rst is not None, "no RST_STREAM for the malformed request"
    assert conn.wait_answer(3), "the valid request after it was not answered"
    assert not conn.answered(1), "the malformed request was answered"
    assert app_calls(app) == before + 1, "the malformed request reached the app"
    return int(rst.error_code)


MALFORMED_REQUESTS = {
    "crlf_in_value_smuggles": [
        *REQUEST,
        (b"x-a", b"a\r\ncontent-length: 0\r\n\r\nGET /s HTTP/1.1"),
    ],
    "lf_in_value": [*REQUEST, (b"x-a", b"a\nb")],
    "nul_in_value": [*REQUEST, (b"x-a", b"a\x00b")],
    "leading_space_in_value": [*REQUEST, (b"x-a", b" a")],
    "trailing_tab_in_value": [*REQUEST, (b"x-a", b"a\t")],
    "uppercase_name": [*REQUEST, (b"X-A", b"a")],
    "space_in_name": [*REQUEST, (b"x a", b"a")],
    "colon_in_name": [*REQUEST, (b"x:a", b"a")],
    "nul_in_name": [*REQUEST, (b"x\x00a", b"a")],
    "crlf_in_name": [*REQUEST, (b"x\r\nfoo", b"a")],
    "empty_name": [*REQUEST, (b"", b"a")],
    "crlf_in_path": [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/a\r\nx: y"),
        AUTHORITY,
    ],
    "space_in_method": [
        (b":method", b"GET /x"),
        (b":scheme", b"http"),
        (b":path", b"/echo"),
        AUTHORITY,
    ],
    "crlf_in_method": [
        (b":method", b"G\r\nET"),
        (b":scheme", b"http"),
        (b":path", b"/echo"),
        AUTHORITY,
    ],
    "empty_path": [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b""), AUTHORITY],
    "path_not_origin_form": [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"echo"),
        AUTHORITY,
    ],
    "star_path_for_get": [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"*"), AUTHORITY],
    "missing_scheme": [(b":method", b"GET"), (b":path", b"/echo"), AUTHORITY],
    "unknown_pseudo": [*REQUEST, (b":status", b"200")],
    "pseudo_after_regular": [REQUEST[0], (b"x-a", b"a"), *REQUEST[1:]],
    "duplicate_pseudo": [*REQUEST, (b":path", b"/echo")],
    "no_authority_nor_host": REQUEST[:3],
    "connection_header": [*REQUEST, (b"connection", b"close")],
    "transfer_encoding": [*REQUEST, (b"transfer-encoding", b"chunked")],
    "te_not_trailers": [*REQUEST, (b"te", b"gzip")],
    "crlf_in_authority": [*REQUEST[:3], (b":authority", b"x\r\nhost: evil")],
}


@pytest.mark.parametrize("fields", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_8_2_8_3_malformed_request_is_reset_and_never_reaches_the_app(
    target: tuple[Proc, Sidecar], conn: Conn, fields: list[tuple[bytes, bytes]]
) -> None:
    """RFC 9113 8.1.1: malformed requests MUST be treated as a stream error of type
    PROTOCOL_ERROR; intermediaries MUST NOT forward them (8.2.1, 8.3.1)."""
    code = _refused_then_served(target, conn, headers(1, block(fields), "END_STREAM"))
    assert code == PROTOCOL_ERROR


def test_8_1_malformed_trailers_are_reset(conn: Conn) -> None:
    """RFC 9113 8.1, 8.2.1: a trailer field with CR/LF makes the request malformed."""
    conn.send(headers(1, block([(b":method", b"POST"), *REQUEST[1:]])))
    trailers = headers(1, block([(b"x-t", b"a\r\n\r\nGET /s HTTP/1.1")]), "END_STREAM")
    conn.send(trailers)
    rst = conn.reset(1)
    assert rst is not None and rst.error_code == PROTOCOL_ERROR


def test_5_1_data_on_a_closed_stream_is_stream_closed(
    target: tuple[Proc, Sidecar], conn: Conn
) -> None:
    """RFC 9113 5.1: an endpoint that receives DATA on a closed stream MUST treat it as
    an error of type STREAM_CLOSED."""
    conn.send(headers(1, block(REQUEST), "END_STREAM"))
    assert conn.wait_answer(1)
    assert conn.until(lambda f: f.stream_id == 1 and "END_STREAM" in f.flags) is not None
    data = DataFrame(1, b"late")
    conn.send(data)
    frame = conn.until(
        lambda f: isinstance(f, GoAwayFrame) or (isinstance(f, RstStreamFrame) and f.stream_id == 1)
    )
    assert frame is not None and frame.error_code == STREAM_CLOSED  # type: ignore[attr-defined]


def test_5_3_1_headers_depending_on_itself_is_reset_not_answered(
    target: tuple[Proc, Sidecar], conn: Conn
) -> None:
    """RFC 9113 5.3.1: a stream cannot depend on itself; an endpoint MUST treat this
    as a stream error of type PROTOCOL_ERROR."""
    bad = headers(1, block(REQUEST), "END_STREAM", "PRIORITY")
    bad.depends_on, bad.stream_weight = 1, 15
    assert _refused_then_served(target, conn, bad) == PROTOCOL_ERROR


@pytest.mark.parametrize(
    "huffman",
    [b"\x18", b"\x1f\xff"],
    ids=["padded_with_zeros", "padding_longer_than_7_bits"],
)
def test_7541_5_2_bad_huffman_padding_is_compression_error(
    target: tuple[Proc, Sidecar], conn: Conn, huffman: bytes
) -> None:
    """RFC 7541 5.2: padding not the most significant bits of EOS, or longer than 7
    bits, MUST be treated as a decoding error."""
    app, _ = target
    before = app_calls(app)
    field = b"\x00\x03x-a" + bytes([0x80 | len(huffman)]) + huffman  # "a" is 00011
    conn.send(headers(1, block(REQUEST) + field, "END_STREAM"))
    goaway = conn.goaway()
    assert goaway is not None and goaway.error_code == COMPRESSION_ERROR
    assert app_calls(app) == before


def test_7541_5_2_huffman_padded_with_ones_is_served(
    target: tuple[Proc, Sidecar], conn: Conn
) -> None:
    """RFC 7541 5.2: the control for the two above; all-ones padding is valid."""
    field = b"\x00\x03x-a\x81\x1f"
    conn.send(headers(1, block(REQUEST) + field, "END_STREAM"))
    assert conn.wait_answer(1)


def test_outbound_listener_refuses_the_smuggling_value_too(
    target: tuple[Proc, Sidecar],
) -> None:
    """Finding 1 on the outbound listener: the CR/LF value is reset there, before any
    route or upstream, and the valid call after it crosses the mesh."""
    app, sidecar = target
    c = Conn(sidecar.ports["outbound"])
    try:
        path = [(b":method", b"GET"), (b":scheme", b"http")]
        route = (b":path", b"/v1/invoke/inventory/echo")
        path.append(AUTHORITY)
        bad = [*path, route, (b"x-a", b"a\r\ncontent-length: 0\r\n\r\nGET /s HTTP/1.1")]
        before = app_calls(app)
        c.send(
            headers(1, block(bad), "END_STREAM"), headers(3, block([*path, route]), "END_STREAM")
        )
        rst = c.reset(1)
        assert rst is not None and rst.error_code == PROTOCOL_ERROR
        assert c.wait_answer(3) and not c.answered(1)
        assert app_calls(app) == before + 1
    finally:
        c.close()
