"""The proxy-wasm ABI as data: enum values, the host-function signature table and the
header-map ("pairs") encoding. No wasmtime here; everything is bytes in, bytes out.

Values follow spec v0.2.1 and proxy-wasm-cpp-sdk's enums (which the SDKs share).
"""

from __future__ import annotations

import struct
from enum import IntEnum

from sidecar.sdk import Headers

ABI_MARKERS = {
    "proxy_abi_version_0_2_1": "0.2.1",
    "proxy_abi_version_0_2_0": "0.2.0",
    "proxy_abi_version_0_1_0": "0.1.0",
}

# cpp-host's PairsUtil limits: a serialized map over either is refused.
MAX_PAIRS = 1024
MAX_PAIRS_BYTES = 1 << 20


class WasmResult(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    UNIMPLEMENTED = 12


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_CALL_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8


class MapType(IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_CALL_INITIAL_METADATA = 4
    GRPC_CALL_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


# WASI errno values the stubs answer with.
WASI_SUCCESS = 0
WASI_BADF = 8
WASI_FAULT = 21
WASI_INVAL = 28
WASI_NOTSUP = 58

I32 = "i32"
I64 = "i64"

# Host functions by name: (params, results). Used to tell a known import declared with a
# shape this host cannot serve (linked as an UNIMPLEMENTED stub instead) from a real match.
_P = {n: (I32,) * n for n in range(13)}
PROXY_FUNCS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "proxy_log": (_P[3], (I32,)),
    "proxy_get_log_level": (_P[1], (I32,)),
    "proxy_get_current_time_nanoseconds": (_P[1], (I32,)),
    "proxy_set_tick_period_milliseconds": (_P[1], (I32,)),
    "proxy_done": (_P[0], (I32,)),
    "proxy_set_effective_context": (_P[1], (I32,)),
    "proxy_get_buffer_bytes": (_P[5], (I32,)),
    "proxy_set_buffer_bytes": (_P[5], (I32,)),
    "proxy_get_buffer_status": (_P[3], (I32,)),
    "proxy_get_header_map_size": (_P[2], (I32,)),
    "proxy_get_header_map_pairs": (_P[3], (I32,)),
    "proxy_set_header_map_pairs": (_P[3], (I32,)),
    "proxy_get_header_map_value": (_P[5], (I32,)),
    "proxy_add_header_map_value": (_P[5], (I32,)),
    "proxy_replace_header_map_value": (_P[5], (I32,)),
    "proxy_remove_header_map_value": (_P[3], (I32,)),
    "proxy_continue_stream": (_P[1], (I32,)),
    "proxy_close_stream": (_P[1], (I32,)),
    "proxy_continue_request": (_P[0], (I32,)),
    "proxy_continue_response": (_P[0], (I32,)),
    "proxy_get_configuration": (_P[2], (I32,)),
    "proxy_send_local_response": (_P[8], (I32,)),
    "proxy_http_call": (_P[10], (I32,)),
    "proxy_set_shared_data": (_P[5], (I32,)),
    "proxy_get_shared_data": (_P[5], (I32,)),
    "proxy_register_shared_queue": (_P[3], (I32,)),
    "proxy_resolve_shared_queue": (_P[5], (I32,)),
    "proxy_enqueue_shared_queue": (_P[3], (I32,)),
    "proxy_dequeue_shared_queue": (_P[3], (I32,)),
    "proxy_define_metric": (_P[4], (I32,)),
    "proxy_record_metric": ((I32, I64), (I32,)),
    "proxy_increment_metric": ((I32, I64), (I32,)),
    "proxy_get_metric": (_P[2], (I32,)),
    "proxy_get_property": (_P[4], (I32,)),
    "proxy_set_property": (_P[4], (I32,)),
    "proxy_get_status": (_P[3], (I32,)),
}

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")
WASI_FUNCS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fd_write": (_P[4], (I32,)),
    "clock_time_get": ((I32, I64, I32), (I32,)),
    "random_get": (_P[2], (I32,)),
    "environ_sizes_get": (_P[2], (I32,)),
    "environ_get": (_P[2], (I32,)),
    "args_sizes_get": (_P[2], (I32,)),
    "args_get": (_P[2], (I32,)),
    "proc_exit": (_P[1], ()),
}

# Callbacks the host may drive (looked up once per instance; absent ones are skipped).
CALLBACKS = (
    "proxy_on_context_create",
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_tick",
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_done",
    "proxy_on_log",
    "proxy_on_delete",
    "proxy_on_http_call_response",
    "proxy_on_queue_ready",
)

_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")


def encode_pairs(pairs: Headers) -> bytes:
    """Serialize a header map: u32 N, N x (u32 key_len, u32 value_len), then key\\0value\\0..."""
    if not pairs:
        return b""
    sizes = [_U32.pack(len(pairs))]
    data: list[bytes] = []
    for key, value in pairs:
        sizes.append(_U32x2.pack(len(key), len(value)))
        data.append(key)
        data.append(b"\0")
        data.append(value)
        data.append(b"\0")
    return b"".join(sizes) + b"".join(data)


class PairsError(ValueError):
    pass


def decode_pairs(raw: bytes | memoryview) -> Headers:
    """Parse a serialized header map with cpp-host's checks (size, count, NULs, no trailer)."""
    size = len(raw)
    if size == 0 or (size == 1 and raw[0] == 0):
        return []
    if size > MAX_PAIRS_BYTES:
        raise PairsError("header map over 1 MiB")
    if size < 4:
        raise PairsError("truncated header map")
    (count,) = _U32.unpack_from(raw, 0)
    if count > MAX_PAIRS:
        raise PairsError(f"{count} pairs, over the {MAX_PAIRS} limit")
    pos = 4 + 8 * count
    if pos > size:
        raise PairsError("truncated header map")
    out: Headers = []
    for i in range(count):
        klen, vlen = _U32x2.unpack_from(raw, 4 + 8 * i)
        kend = pos + klen
        vend = kend + 1 + vlen
        if vend >= size or raw[kend] != 0 or raw[vend] != 0:
            raise PairsError("header map entry missing its NUL terminator")
        out.append((bytes(raw[pos:kend]), bytes(raw[kend + 1 : vend])))
        pos = vend + 1
    if pos != size:
        raise PairsError("trailing bytes after the header map")
    return out
