"""Properties a guest reads with proxy_get_property, named as Envoy names its attributes.

Path segments arrive NUL-separated and are joined with "." before the lookup. Strings are
raw bytes; integers (ports, status codes) are 8-byte little-endian, as Envoy encodes them;
maps are serialized header maps. Values the guest set with proxy_set_property win.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from .abi import MapType, encode_pairs
from .context import HttpStream

if TYPE_CHECKING:
    from .host import Host

_I64 = struct.Struct("<q")


def _int(value: int) -> bytes:
    return _I64.pack(value)


def _split_address(address: str) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, None
    return host.strip("[]"), int(port)


def _header(stream: HttpStream, map_type: int, name: bytes) -> bytes | None:
    for key, value in stream.pairs_for(map_type, name) or ():
        if key == name:
            return value
    return None


def _request(stream: HttpStream, field: str) -> bytes | None:
    req = MapType.HTTP_REQUEST_HEADERS
    if field == "path":
        return _header(stream, req, b":path")
    if field == "url_path":
        path = _header(stream, req, b":path")
        return path.split(b"?", 1)[0] if path is not None else None
    if field == "query":
        path = _header(stream, req, b":path") or b""
        return path.split(b"?", 1)[1] if b"?" in path else b""
    if field == "method":
        return _header(stream, req, b":method")
    if field == "host":
        return _header(stream, req, b":authority")
    if field == "scheme":
        return _header(stream, req, b":scheme")
    if field == "id":
        return _header(stream, req, b"x-request-id")
    if field == "protocol":
        return stream.protocol.encode() or None
    if field == "headers":
        return encode_pairs(stream.whole(req) or [])
    if field.startswith("headers."):
        return _header(stream, req, field[8:].lower().encode())
    return None


def _response(stream: HttpStream, field: str) -> bytes | None:
    resp = MapType.HTTP_RESPONSE_HEADERS
    if not stream.has(resp):
        return None
    if field == "code":
        status = _header(stream, resp, b":status")
        return _int(int(status)) if status and status.isdigit() else None
    if field == "headers":
        return encode_pairs(stream.whole(resp) or [])
    if field.startswith("headers."):
        return _header(stream, resp, field[8:].lower().encode())
    return None


def _address(address: str, field: str) -> bytes | None:
    if not address:
        return None
    host, port = _split_address(address)
    if field == "address":
        return address.encode()
    if field == "port" and port is not None:
        return _int(port)
    if field == "host":
        return host.encode()
    return None


_PLUGIN: dict[str, Callable[[Host], bytes]] = {
    "plugin_root_id": lambda p: p.root_id.encode(),
    "plugin_name": lambda p: p.name.encode(),
    "plugin_vm_id": lambda p: p.vm_id.encode(),
    "node.id": lambda p: p.service_name.encode(),
    "opus.service": lambda p: p.service_name.encode(),
    "opus.direction": lambda p: p.direction.encode(),
    "listener_direction": lambda p: _int(1 if p.direction == "inbound" else 2),
}


def lookup_property(path: str, stream: HttpStream | None, host: Host) -> bytes | None:
    if stream is not None and stream.properties is not None and path in stream.properties:
        return stream.properties[path]
    if path in host.properties:
        return host.properties[path]
    static = _PLUGIN.get(path)
    if static is not None:
        return static(host)
    if stream is None:
        return None
    head, _, rest = path.partition(".")
    if head == "request":
        return _request(stream, rest)
    if head == "response":
        return _response(stream, rest)
    if head == "source":
        return _address(stream.source, rest)
    if head in ("destination", "upstream"):
        endpoint = stream.endpoint
        return _address(endpoint.address if endpoint is not None else "", rest)
    if path in ("cluster_name", "xds.cluster_name"):
        return stream.cluster.encode() or None
    return None
