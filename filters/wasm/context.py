"""Per-call state a filter instance keeps for one HTTP stream (the ABI's "HTTP context"),
and the outcome of a callback as the chain sees it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sidecar.proto.messages import Headers

from .abi import MapType, encode_pairs


@dataclass(slots=True)
class LocalReply:
    status: int
    details: bytes
    body: bytes
    headers: Headers
    grpc_status: int


@dataclass(slots=True)
class HttpStream:
    """Headers, bodies and trailers of one call while the guest may read or change them.

    Header maps hold lower-case names; request maps carry the pseudo-headers (:method,
    :path, :authority, :scheme) and response maps :status, as Envoy shows them to filters.
    Serialized maps are cached until the map changes (most filters read, few write).
    """

    id: int
    maps: dict[int, Headers] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    encoded: dict[int, bytes] = field(default_factory=dict)
    request_body: bytes = b""
    response_body: bytes = b""
    local_reply: LocalReply | None = None
    resumed: asyncio.Event | None = None  # set by proxy_continue_stream / close_stream
    closed: bool = False
    continued: bool = False  # proxy_continue_stream was called since the last callback
    properties: dict[str, bytes] = field(default_factory=dict)  # set by the guest
    info: dict[str, str] = field(default_factory=dict)  # source, destination, cluster, protocol

    def headers(self, map_type: int) -> Headers | None:
        return self.maps.get(map_type)

    def changed(self, map_type: int) -> None:
        self.dirty.add(map_type)
        self.encoded.pop(map_type, None)

    def encode(self, map_type: int) -> bytes:
        cached = self.encoded.get(map_type)
        if cached is None:
            cached = self.encoded[map_type] = encode_pairs(self.maps.get(map_type) or [])
        return cached

    def resume(self) -> None:
        self.continued = True
        if self.resumed is not None:
            self.resumed.set()


REQUEST_MAPS = (MapType.HTTP_REQUEST_HEADERS, MapType.HTTP_REQUEST_TRAILERS)
