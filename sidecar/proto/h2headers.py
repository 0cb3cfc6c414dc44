"""Header blocks (RFC 9113 4.3, 6.2, 6.10, 8.1-8.3), both ways: a header list encoded and
split into HEADERS and CONTINUATION frames; and, inbound, the fragments assembled, the
block decoded with HPACK and checked (sidecar/proto/h2fields.py), and what it does to its
stream: a request or response head opens or answers it, trailers end it.
"""

from __future__ import annotations

from operator import itemgetter

from h2.errors import ErrorCodes

from sidecar.proto.h2events import (
    Event,
    Headers,
    RequestReceived,
    ResponseReceived,
    TrailersReceived,
)
from sidecar.proto.h2fields import (
    HPACK_PASSED,
    HpackViolation,
    Malformed,
    check_hpack_block,
    check_trailers,
    request_length,
    response_length,
)
from sidecar.proto.h2frames import (
    CONTINUATION,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_STREAM_ID,
    PADDED,
    PRIORITY_FLAG,
    ProtocolError,
    StreamClosedError,
    StreamError,
    unpack_u32_from,
)
from sidecar.proto.h2state import COMPILED_HPACK, ConnectionState, Stream

_PAIR = itemgetter(0, 1)

# A flag of our own (beyond the wire's 8 bits) carried with a header block: its HEADERS
# made the stream depend on itself (RFC 9113 5.3.1).
_SELF_DEPENDENT = 0x100


class HeaderBlocks(ConnectionState):
    """HEADERS and CONTINUATION, sent and received."""

    # -- sending ------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id != self._next_id:
                raise StreamClosedError(f"stream {stream_id} is not open")
            stream = Stream(self.remote_window, self.local_window)
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

    # -- receiving ----------------------------------------------------------------

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
            if unpack_u32_from(payload, start - 5)[0] & MAX_STREAM_ID == stream_id:
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
                # jh2 gives (name, value, sensitive): the pairs, taken at C speed.
                headers: Headers = list(map(_PAIR, self._decoder.decode(block, True)))
                # What jh2's decoder lets through (hpack's refuses it itself); a block
                # of indexed fields only, or one that passed before, needs no walk.
                if len(block) != len(headers) and block not in HPACK_PASSED:
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
                raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, "depends on itself")
            if len(self.streams) >= self.local_max_streams:
                raise StreamError(stream_id, ErrorCodes.REFUSED_STREAM, "too many streams")
            # Until our SETTINGS are acknowledged the peer may assume the default window.
            stream = Stream(self.remote_window, max(self.local_window, DEFAULT_WINDOW))
            self.streams[stream_id] = stream
            self._on_head(stream_id, stream, headers, end_stream, events)
            return
        if flags & _SELF_DEPENDENT:
            raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, "depends on itself")
        if stream.remote_closed:
            raise StreamError(stream_id, ErrorCodes.STREAM_CLOSED, "HEADERS after END_STREAM")
        if not stream.head_received:
            self._on_head(stream_id, stream, headers, end_stream, events)
            return
        # Trailers: they end the stream and carry no pseudo-header.
        try:
            if not end_stream:
                raise Malformed("a second header block without END_STREAM")
            check_trailers(headers)
        except Malformed as exc:
            raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, str(exc)) from None
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
        raise StreamError(stream_id, ErrorCodes.STREAM_CLOSED, "trailers on a closed stream")

    def _on_head(
        self,
        stream_id: int,
        stream: Stream,
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
            raise StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR, str(exc)) from None
        stream.expected_length = length
        stream.head_received = True
        events.append(event)
        if end_stream:
            self._end_remote(stream_id, stream, events)
