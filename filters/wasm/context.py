"""Per-call state a filter instance keeps for one HTTP stream (the ABI's "HTTP context"),
and the outcome of a callback as the chain sees it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.sdk import Headers

from .abi import MapType, encode_pairs

if TYPE_CHECKING:
    from sidecar.sdk import Call, Endpoint

_REQ = int(MapType.HTTP_REQUEST_HEADERS)
_RESP = int(MapType.HTTP_RESPONSE_HEADERS)


@dataclass(slots=True)
class LocalReply:
    status: int
    details: bytes
    body: bytes
    headers: Headers
    grpc_status: int


class CalloutResponse:
    """The reply to a guest's proxy_http_call, as its callback reads it."""

    __slots__ = ("body", "headers", "trailers")

    def __init__(self, headers: Headers, body: bytes, trailers: Headers) -> None:
        self.headers = headers
        self.body = body
        self.trailers = trailers


def dirty_bit(map_type: int) -> int:
    """A map's bit in HttpStream.dirty; the bodies count as maps -1 and -2."""
    return 1 << (map_type + 2)


class HttpStream:
    """Headers, bodies and trailers of one call while the guest may read or change them.

    Header maps hold lower-case names; request maps carry the pseudo-headers (:method,
    :path, :authority, :scheme) and response maps :status, as Envoy shows them to filters.

    The request and response maps are built only when the guest needs them whole (all
    pairs, a pseudo-header, the serialized form). Until then a lookup or an edit of an
    ordinary header acts on the "plain" list: a copy of the message's own headers taken
    when the guest was shown them, so what the guest sees is that moment's headers either
    way, and an edit reaches the message only when the phase ends without a trap. Most
    filters touch one or two headers; this spares them building, and writing back, the
    whole map. Serialized maps are cached until the map changes.

    Most attributes keep their class-level default for the whole call (a stream that
    never pauses, answers locally or sets a property): only what changes is set.
    """

    request_plain: Headers | None = None  # the request's ordinary headers, map not built
    response_plain: Headers | None = None
    staged: Call | None = None  # a request not shown to the guest yet
    request_head: tuple[bytes, bytes, bytes, bytes] = (b"", b"", b"", b"")
    status = 0  # the response's, for :status
    dirty = 0  # dirty_bit()s of the maps and bodies the guest changed
    encoded: dict[int, bytes] | None = None
    request_body = b""
    response_body = b""
    local_reply: LocalReply | None = None
    resumed: asyncio.Event | None = None  # set by proxy_continue_stream / close_stream
    closed = False
    continued = False  # proxy_continue_stream was called since the last callback
    ended = False  # on_done, on_log and on_delete ran (vm.finish)
    end_error: Exception | None = None  # ... and trapped: close_stream reports it
    properties: dict[str, bytes] | None = None  # set by the guest
    source = ""  # the caller's address
    cluster = ""
    protocol = ""
    endpoint: Endpoint | None = None  # where the call went, once it came back

    def __init__(self, id: int) -> None:
        self.id = id
        self.maps: dict[int, Headers] = {}  # built maps (trailers are always built)

    # -- the request and response maps ----------------------------------------------------

    def stage_request(self, call: Call) -> int:
        """The request to show the guest from on_request_headers on (not while it creates
        the context); returns the request map's size (num_headers)."""
        self.staged = call
        return 4 + len(call.request.headers)

    def show_request(self) -> None:
        call = self.staged
        if call is None:
            return
        self.staged = None
        req = call.request
        self.source = req.peer
        self.cluster = call.service
        self.protocol = req.protocol
        self.request_head = (req.method, call.path, call.authority, req.scheme)
        self.request_plain = list(req.headers)

    def begin_response(self, status: int, headers: Headers) -> int:
        """Show the guest this response; returns the map's size (num_headers)."""
        self.status = status
        self.response_plain = list(headers)
        return 1 + len(headers)

    def plain(self, map_type: int) -> Headers | None:
        """The ordinary headers of a map not built yet (None once built, or if absent)."""
        if map_type == _REQ:
            return self.request_plain
        if map_type == _RESP:
            return self.response_plain
        return None

    def has(self, map_type: int) -> bool:
        return map_type in self.maps or self.plain(map_type) is not None

    def whole(self, map_type: int) -> Headers | None:
        """The whole map, pseudo-headers first (built now if need be); None if absent."""
        pairs = self.maps.get(map_type)
        if pairs is not None:
            return pairs
        if map_type == _REQ and self.request_plain is not None:
            method, path, authority, scheme = self.request_head
            pairs = [(b":method", method), (b":path", path), (b":authority", authority)]
            pairs.append((b":scheme", scheme))
            pairs += self.request_plain
            self.request_plain = None
        elif map_type == _RESP and self.response_plain is not None:
            pairs = [(b":status", b"%d" % self.status), *self.response_plain]
            self.response_plain = None
        else:
            return None
        self.maps[map_type] = pairs
        return pairs

    def pairs_for(self, map_type: int, name: bytes) -> Headers | None:
        """What a lookup or edit of header `name` acts on: the whole map, or while it is
        not built and `name` is not a pseudo-header, its ordinary headers alone (the
        pseudo-headers never match such a name)."""
        pairs = self.maps.get(map_type)
        if pairs is not None:
            return pairs
        if name[:1] != b":":
            plain = self.plain(map_type)
            if plain is not None:
                return plain
        return self.whole(map_type)

    def changed(self, map_type: int) -> None:
        self.dirty |= 1 << (map_type + 2)
        if self.encoded:
            self.encoded.pop(map_type, None)

    def encode(self, map_type: int) -> bytes:
        if self.encoded is None:
            self.encoded = {}
        cached = self.encoded.get(map_type)
        if cached is None:
            cached = self.encoded[map_type] = encode_pairs(self.whole(map_type) or [])
        return cached

    def resume(self) -> None:
        self.continued = True
        if self.resumed is not None:
            self.resumed.set()


REQUEST_MAPS = (MapType.HTTP_REQUEST_HEADERS, MapType.HTTP_REQUEST_TRAILERS)
