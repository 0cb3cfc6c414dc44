"""The HTTP/1.1 encoders (sidecar.proto.h1write) and the response fields
(sidecar.proto.h1response), driven with bytes only."""

from __future__ import annotations

import httptools
import pytest

from sidecar.proto.h1response import Refused, ResponseFields
from sidecar.proto.h1write import (
    CHUNKED,
    UNTIL_CLOSE,
    WHOLE,
    Unwritable,
    encode_request,
    encode_response_head,
)


def test_a_whole_request_goes_with_its_length() -> None:
    wire, left = encode_request(b"POST", b"/a", b"app", [(b"x-a", b"1")], b"hi", None)
    assert left == WHOLE
    assert wire == b"POST /a HTTP/1.1\r\nhost: app\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nhi"


def test_a_whole_body_with_trailers_goes_chunked() -> None:
    wire, left = encode_request(b"POST", b"/a", b"app", [], b"hi", b"0\r\nx-t: 1\r\n\r\n")
    assert left == WHOLE
    assert wire.endswith(b"transfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-t: 1\r\n\r\n")


def test_a_streamed_request_keeps_its_own_length_or_goes_chunked() -> None:
    fields = [(b"content-length", b"10"), (b"connection", b"close")]
    wire, left = encode_request(b"PUT", b"/a", b"app", fields, None, None)
    assert left == 10 and wire.endswith(b"\r\ncontent-length: 10\r\n\r\n")
    assert b"connection" not in wire
    _, left = encode_request(b"PUT", b"/a", b"app", [], None, None)
    assert left == CHUNKED


@pytest.mark.parametrize(
    ("method", "target", "authority", "fields", "blamed"),
    [
        (b"GET", b"/a\r\nx: 1", b"app", [], "request target"),
        (b"GET", b"/a", b"app\r\n", [], "authority"),
        (b"G T", b"/a", b"app", [], "method"),
        (b"GET", b"/a", b"app", [(b"x", b"1\r\nx-smuggled: 1")], "header b'x'"),
        (b"GET", b"/a", b"app", [(b"a b", b"1")], "header b'a b'"),
    ],
)
def test_a_request_that_would_not_read_back_is_unwritable(
    method: bytes, target: bytes, authority: bytes, fields: list[tuple[bytes, bytes]], blamed: str
) -> None:
    with pytest.raises(Unwritable, match=blamed):
        encode_request(method, target, authority, fields, b"", None)


def test_a_bad_streamed_content_length_is_blamed() -> None:
    with pytest.raises(Unwritable, match="content-length"):
        encode_request(b"PUT", b"/a", b"app", [(b"content-length", b"1, 2")], None, None)


def test_response_heads() -> None:
    head, left, keep = encode_response_head(200, [(b"x", b"1")], b"abc", False, True, False)
    assert (head, left, keep) == (
        b"HTTP/1.1 200 OK\r\nx: 1\r\ncontent-length: 3\r\n\r\n",
        WHOLE,
        True,
    )
    head, left, keep = encode_response_head(200, [], None, True, True, False)
    assert left == CHUNKED and b"transfer-encoding: chunked" in head and keep
    head, left, keep = encode_response_head(200, [], None, True, True, True)
    assert left == UNTIL_CLOSE and not keep and head.endswith(b"connection: close\r\n\r\n")
    head, left, _ = encode_response_head(200, [(b"content-length", b"7")], None, True, True, False)
    assert left == 7
    head, left, _ = encode_response_head(204, [(b"connection", b"x")], None, False, False, False)
    assert head == b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("fields", "data", "why"),
    [
        ([(b"x", b"a\r\nb: c")], b"", "cannot carry"),
        ([(b"content-length", b"9")], b"abc", "does not have"),
        ([(b"content-length", b"1"), (b"content-length", b"1")], None, "two"),
        ([(b"x y", b"1")], b"", "not a token"),
    ],
)
def test_a_response_head_that_would_not_read_back_is_unwritable(
    fields: list[tuple[bytes, bytes]], data: bytes | None, why: str
) -> None:
    with pytest.raises(Unwritable, match=why):
        encode_response_head(200, fields, data, data is None, True, False)


class _Fields(ResponseFields):
    """ResponseFields on httptools, as the connection uses it, recording the blocks."""

    def __init__(self) -> None:
        super().__init__(max_header_bytes=64)
        self.parser = httptools.HttpResponseParser(self)
        self.heads: list[list[tuple[bytes, bytes]]] = []
        self.trailers: list[list[tuple[bytes, bytes]]] = []

    def on_headers_complete(self) -> None:
        self.heads.append(self._headers)
        self._headers = []
        self._in_head = False

    def on_message_complete(self) -> None:
        self._in_head = True
        self.trailers.append(self.take_trailers(self._headers) if self._headers else [])


def test_response_fields_keep_trailers_a_block_of_their_own() -> None:
    fields = _Fields()
    fields.parser.feed_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"1\r\nz\r\n0\r\nX-T: 2\r\nTrailer: x-t\r\n\r\n"
    )
    assert fields.heads == [[(b"x-a", b"1")]]
    assert fields.trailers == [[(b"x-t", b"2")]]


def test_response_fields_refuse_a_coding_they_cannot_decode() -> None:
    fields = _Fields()
    with pytest.raises(httptools.HttpParserCallbackError) as raised:
        fields.parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert isinstance(raised.value.__context__, Refused)
    assert "'gzip' is not implemented" in str(raised.value.__context__)


def test_response_fields_count_trailers_against_the_limit() -> None:
    fields = _Fields()
    fields.parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    fields.parser.feed_data(b"X-T: " + b"t" * 80 + b"\r\nX-")  # the next field began
    assert fields.count_trailers() == ("response trailers over 64 bytes (limits.max_header_bytes)")


def test_names_and_authorities_learned_stay_bounded_in_size() -> None:
    """(A token name or authority is remembered once checked, unless it is long: the
    tables hold at most _LEARNED_MAX short entries; every one is still checked.)"""
    from sidecar.proto import h1head

    long_name = b"x" * (h1head._LEARNED_SIZE_MAX + 1)
    assert h1head.kind_of(b"x-short-learned") == h1head.PLAIN
    assert h1head.kind_of(long_name) == h1head.PLAIN
    assert b"x-short-learned" in h1head.KINDS and long_name not in h1head.KINDS
    assert h1head.kind_of(b"x y") == h1head.BAD and b"x y" not in h1head.KINDS
    long_host = b"h" * (h1head._LEARNED_SIZE_MAX + 1)
    head = b"GET / HTTP/1.1\r\nhost: " + long_host + b"\r\n\r\n"
    assert h1head.request_head_ok(head, 3, b"GET", b"/", long_host)
    assert long_host not in h1head._AUTHORITIES
