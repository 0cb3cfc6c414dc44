"""The host functions a guest imports (module `env`, plus the WASI subset SDKs need).

Each is a method taking the raw i32/i64 arguments and returning a WasmResult; guest memory
is reached through the instance's raw buffer. `HostCalls` holds the per-instance state the
functions act on (memory, contexts, the running callback) and reaches the configured
filter only through the `Host` protocol; `WasmVM` (vm.py) owns one, links its functions
and drives the callbacks.
"""

from __future__ import annotations

import logging
import os
import struct
import time

from .abi import (
    WASI_FAULT,
    WASI_SUCCESS,
    BufferType,
    MapType,
    PairsError,
    WasmResult,
    decode_pairs,
    encode_pairs,
)
from .context import CalloutResponse, HttpStream, LocalReply
from .fused import Fused
from .host import Host
from .native import ExportFn, HostError, PublicMemory, RawMemory
from .properties import lookup_property

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OK = int(WasmResult.OK)
_NOT_FOUND = int(WasmResult.NOT_FOUND)
_BAD_ARGUMENT = int(WasmResult.BAD_ARGUMENT)
_BAD_MEMORY = int(WasmResult.INVALID_MEMORY_ACCESS)
_CALLOUT_HEADERS = int(MapType.HTTP_CALL_RESPONSE_HEADERS)
_REQ = int(MapType.HTTP_REQUEST_HEADERS)
_RESP = int(MapType.HTTP_RESPONSE_HEADERS)
_PY_LEVELS = {0: 5, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class ProcExit(Exception):
    """The guest called proc_exit (the AssemblyScript SDK's abort): a trap."""


class HostCalls:
    """Host-function implementations over one instance's memory and contexts."""

    mem: RawMemory | PublicMemory  # set once the instance exists (WasmVM.__init__)
    malloc: ExportFn | None

    def __init__(self, host: Host, abi: str, min_level: int) -> None:
        self.host = host
        self.abi = abi
        self.min_level = min_level  # guest log levels below this are dropped before decoding
        self.root_id = 1
        self.active_id = 0  # the context whose callback is running
        self.effective_id = 0  # what proxy_set_effective_context chose (0: the active one)
        self.streams: dict[int, HttpStream] = {}
        self.callout: CalloutResponse | None = None
        self.fused: Fused | None = None  # the fused-call driver (fused.py), when linked
        self.staging: HttpStream | None = None  # shown once the driver reaches on_request_headers
        self.effective_step = 0  # the driver's step when the effective context was set

    # -- memory -----------------------------------------------------------------------

    def at(self, ptr: int, size: int) -> int:
        """The view index of guest bytes [ptr, ptr + size), bounds-checked."""
        mem = self.mem
        if ptr + size > mem.size and ptr + size > mem.refresh():
            raise HostError(_BAD_MEMORY)
        return mem.base + ptr

    def read(self, ptr: int, size: int) -> bytes:
        mem = self.mem  # at(), inlined: most host calls read a name or two
        end = ptr + size
        if end > mem.size and end > mem.refresh():
            raise HostError(_BAD_MEMORY)
        return mem.view[mem.base + ptr : mem.base + end].tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        at = self.at(ptr, len(data))
        self.mem.view[at : at + len(data)] = data

    def put_u32(self, ptr: int, value: int) -> None:
        _U32.pack_into(self.mem.view, self.at(ptr, 4), value)

    def put_u64(self, ptr: int, value: int) -> None:
        _U64.pack_into(self.mem.view, self.at(ptr, 8), value & 0xFFFFFFFFFFFFFFFF)

    def give(self, data: bytes, ptr_ptr: int, size_ptr: int) -> int:
        """Copy `data` into guest-allocated memory; write its address and size (cpp-host's
        copyToPointerSize: an empty value is 0/0 without calling the allocator)."""
        size = len(data)
        if size == 0:
            self.put_u32(ptr_ptr, 0)
            self.put_u32(size_ptr, 0)
            return _OK
        if self.malloc is None:
            return _BAD_MEMORY
        addr = self.malloc(size) & 0xFFFFFFFF
        if addr == 0:
            return _BAD_MEMORY
        self.write(addr, data)  # the allocator may have grown memory: at() re-reads the size
        self.put_u32(ptr_ptr, addr)
        self.put_u32(size_ptr, size)
        return _OK

    def _step(self) -> int:
        """Which callback of a fused call runs (constant between fused calls)."""
        fused = self.fused
        return fused.step if fused is not None else 0

    def _stream(self) -> HttpStream | None:
        if self.staging is not None and self._step() > 1:
            self.staging.show_request()
        # An effective context lasts one callback; in a fused call, the driver's step says
        # whether it was set by this one.
        if self.effective_id and self.effective_step == self._step():
            return self.streams.get(self.effective_id)
        return self.streams.get(self.active_id)

    # -- logging, time, context ---------------------------------------------------------

    def proxy_log(self, level: int, ptr: int, size: int) -> int:
        if level < self.min_level:
            return _OK
        message = self.read(ptr, size).decode("utf-8", "replace")
        self.host.guest_log(_PY_LEVELS.get(level, logging.CRITICAL), message)
        return _OK

    def proxy_get_log_level(self, ret: int) -> int:
        self.put_u32(ret, self.min_level)
        return _OK

    def proxy_get_current_time_nanoseconds(self, ret: int) -> int:
        self.put_u64(ret, time.time_ns())
        return _OK

    def proxy_set_tick_period_milliseconds(self, period: int) -> int:
        self.host.set_tick_period(period)
        return _OK

    def proxy_done(self) -> int:
        return _OK  # the host always finishes a stream's contexts itself

    def proxy_set_effective_context(self, context_id: int) -> int:
        if context_id != self.root_id and context_id not in self.streams:
            return _BAD_ARGUMENT
        self.effective_id = context_id
        self.effective_step = self._step()
        return _OK

    def proxy_get_status(self, code_ptr: int, ptr_ptr: int, size_ptr: int) -> int:
        self.put_u32(code_ptr, 0)
        return self.give(b"", ptr_ptr, size_ptr)

    # -- buffers ------------------------------------------------------------------------

    def _buffer(self, buffer_type: int) -> bytes | None:
        if buffer_type == BufferType.PLUGIN_CONFIGURATION:
            return self.host.configuration
        if buffer_type == BufferType.VM_CONFIGURATION:
            return self.host.vm_configuration
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY:
            return self.callout.body if self.callout is not None else None
        stream = self._stream()
        if stream is None:
            return None
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            return stream.request_body
        if buffer_type == BufferType.HTTP_RESPONSE_BODY:
            return stream.response_body
        return None

    def proxy_get_buffer_bytes(
        self, buffer_type: int, start: int, max_size: int, ptr_ptr: int, size_ptr: int
    ) -> int:
        data = self._buffer(buffer_type)
        if data is None:
            return _NOT_FOUND
        return self.give(data[start : start + max_size], ptr_ptr, size_ptr)

    def proxy_get_configuration(self, ptr_ptr: int, size_ptr: int) -> int:
        return self.give(self.host.configuration, ptr_ptr, size_ptr)

    def proxy_get_buffer_status(self, buffer_type: int, size_ptr: int, flags_ptr: int) -> int:
        data = self._buffer(buffer_type)
        if data is None:
            return _NOT_FOUND
        self.put_u32(size_ptr, len(data))
        self.put_u32(flags_ptr, 0)
        return _OK

    def proxy_set_buffer_bytes(
        self, buffer_type: int, start: int, size: int, ptr: int, value_size: int
    ) -> int:
        stream = self._stream()
        if stream is None or buffer_type not in (0, 1):
            return _NOT_FOUND
        value = self.read(ptr, value_size)
        old = stream.request_body if buffer_type == 0 else stream.response_body
        if start == 0 and size == 0:
            new = value + old  # prepend
        elif start >= len(old):
            new = old + value  # append
        else:
            new = old[:start] + value + old[start + size :]
        if buffer_type == 0:
            stream.request_body = new
        else:
            stream.response_body = new
        stream.changed(-1 - buffer_type)  # bodies are tracked as dirty maps -1 and -2
        return _OK

    # -- header maps --------------------------------------------------------------------

    def _map(self, map_type: int) -> tuple[list[tuple[bytes, bytes]] | None, HttpStream | None]:
        """The whole map and the stream it belongs to (None: a callout's map)."""
        if map_type >= _CALLOUT_HEADERS:
            return self._callout_map(map_type), None
        stream = self._stream()
        if stream is None:
            return None, None
        return stream.whole(map_type), stream

    def _callout_map(self, map_type: int) -> list[tuple[bytes, bytes]] | None:
        if self.callout is None:
            return None
        if map_type == _CALLOUT_HEADERS:
            return self.callout.headers
        return self.callout.trailers

    def _map_for(
        self, map_type: int, key_ptr: int, key_size: int, edit: bool = True
    ) -> tuple[list[tuple[bytes, bytes]] | None, HttpStream | None, bytes]:
        """For a call on one header: the pairs to act on (HttpStream.pairs_for), the
        stream, and the lower-cased name (read only once the map is known to exist and,
        for an edit, to be editable: a callout's maps are read-only)."""
        if map_type >= _CALLOUT_HEADERS:
            pairs = self._callout_map(map_type)
            if pairs is None or edit:
                return None, None, b""
            return pairs, None, self.read(key_ptr, key_size).lower()
        if self.effective_id or self.staging is not None:
            stream = self._stream()
        else:  # _stream(), for the usual case (the headers of the running callback)
            stream = self.streams.get(self.active_id)
        if stream is None:
            return None, None, b""
        pairs = stream.maps.get(map_type)
        if pairs is not None:
            return pairs, stream, self.read(key_ptr, key_size).lower()
        if map_type == _REQ:
            pairs = stream.request_plain
        elif map_type == _RESP:
            pairs = stream.response_plain
        if pairs is None:
            return None, None, b""
        key = self.read(key_ptr, key_size).lower()
        if key[:1] == b":":
            pairs = stream.whole(map_type)  # a pseudo-header: build the map
        return pairs, stream, key

    def proxy_get_header_map_size(self, map_type: int, ret: int) -> int:
        pairs, stream = self._map(map_type)
        if pairs is None:
            return _NOT_FOUND
        size = len(stream.encode(map_type)) if stream is not None else len(encode_pairs(pairs))
        self.put_u32(ret, size)
        return _OK

    def proxy_get_header_map_pairs(self, map_type: int, ptr_ptr: int, size_ptr: int) -> int:
        pairs, stream = self._map(map_type)
        if pairs is None:
            return _NOT_FOUND
        data = stream.encode(map_type) if stream is not None else encode_pairs(pairs)
        return self.give(data, ptr_ptr, size_ptr)

    def proxy_set_header_map_pairs(self, map_type: int, ptr: int, size: int) -> int:
        pairs, stream = self._map(map_type)
        if pairs is None or stream is None:
            return _NOT_FOUND
        try:
            new = decode_pairs(self.read(ptr, size))
        except PairsError:
            return int(WasmResult.PARSE_FAILURE)
        pairs[:] = [(k.lower(), v) for k, v in new]
        stream.changed(map_type)
        return _OK

    def proxy_get_header_map_value(
        self, map_type: int, key_ptr: int, key_size: int, ptr_ptr: int, size_ptr: int
    ) -> int:
        pairs, _, key = self._map_for(map_type, key_ptr, key_size, edit=False)
        if pairs is None:
            return _NOT_FOUND
        for name, value in pairs:
            if name == key:
                return self.give(value, ptr_ptr, size_ptr)
        if self.abi == "0.1.0":
            return self.give(b"", ptr_ptr, size_ptr)
        return _NOT_FOUND

    def proxy_add_header_map_value(
        self, map_type: int, key_ptr: int, key_size: int, value_ptr: int, value_size: int
    ) -> int:
        pairs, stream, key = self._map_for(map_type, key_ptr, key_size)
        if pairs is None or stream is None:
            return _NOT_FOUND
        pairs.append((key, self.read(value_ptr, value_size)))
        stream.dirty |= 1 << (map_type + 2)  # stream.changed(), inlined for the usual edit
        if stream.encoded:
            stream.encoded.pop(map_type, None)
        return _OK

    def proxy_replace_header_map_value(
        self, map_type: int, key_ptr: int, key_size: int, value_ptr: int, value_size: int
    ) -> int:
        pairs, stream, key = self._map_for(map_type, key_ptr, key_size)
        if pairs is None or stream is None:
            return _NOT_FOUND
        value = self.read(value_ptr, value_size)
        kept = [(n, v) for n, v in pairs if n != key]
        at = next((i for i, (n, _) in enumerate(pairs) if n == key), len(kept))
        kept.insert(at, (key, value))
        pairs[:] = kept
        stream.changed(map_type)
        return _OK

    def proxy_remove_header_map_value(self, map_type: int, key_ptr: int, key_size: int) -> int:
        pairs, stream, key = self._map_for(map_type, key_ptr, key_size)
        if pairs is None or stream is None:
            return _NOT_FOUND
        pairs[:] = [(n, v) for n, v in pairs if n != key]
        stream.changed(map_type)
        return _OK

    # -- stream control -----------------------------------------------------------------

    def proxy_continue_stream(self, stream_type: int) -> int:
        stream = self._stream()
        if stream is None:
            return _NOT_FOUND
        stream.resume()
        return _OK

    def proxy_close_stream(self, stream_type: int) -> int:
        stream = self._stream()
        if stream is None:
            return _NOT_FOUND
        stream.closed = True
        stream.resume()
        return _OK

    def proxy_continue_request(self) -> int:
        return self.proxy_continue_stream(0)

    def proxy_continue_response(self) -> int:
        return self.proxy_continue_stream(1)

    def proxy_send_local_response(
        self,
        status: int,
        details_ptr: int,
        details_size: int,
        body_ptr: int,
        body_size: int,
        headers_ptr: int,
        headers_size: int,
        grpc_status: int,
    ) -> int:
        stream = self._stream()
        if stream is None:
            return _NOT_FOUND
        try:
            headers = decode_pairs(self.read(headers_ptr, headers_size))
        except PairsError:
            return int(WasmResult.PARSE_FAILURE)
        if grpc_status >= 1 << 31:
            grpc_status -= 1 << 32
        stream.local_reply = LocalReply(
            status,
            self.read(details_ptr, details_size),
            self.read(body_ptr, body_size),
            [(k.lower(), v) for k, v in headers],
            grpc_status,
        )
        stream.resume()
        return _OK

    # -- properties ---------------------------------------------------------------------

    def proxy_get_property(self, path_ptr: int, path_size: int, ptr_ptr: int, size_ptr: int) -> int:
        path = self.read(path_ptr, path_size).replace(b"\0", b".").decode("utf-8", "replace")
        value = lookup_property(path, self._stream(), self.host)
        if value is None:
            return _NOT_FOUND
        return self.give(value, ptr_ptr, size_ptr)

    def proxy_set_property(
        self, path_ptr: int, path_size: int, value_ptr: int, value_size: int
    ) -> int:
        path = self.read(path_ptr, path_size).replace(b"\0", b".").decode("utf-8", "replace")
        value = self.read(value_ptr, value_size)
        stream = self._stream()
        if stream is None:
            self.host.properties[path] = value
        else:
            if stream.properties is None:
                stream.properties = {}
            stream.properties[path] = value
        return _OK

    # -- WASI subset --------------------------------------------------------------------

    def fd_write(self, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
        if iovs_len > 1024:
            return WASI_FAULT
        table = self.read(iovs, 8 * iovs_len)
        parts = []
        for i in range(iovs_len):
            ptr, size = struct.unpack_from("<II", table, 8 * i)
            parts.append(self.read(ptr, size))
        data = b"".join(parts)
        level = logging.ERROR if fd == 2 else logging.INFO
        self.host.guest_log(level, data.decode("utf-8", "replace").rstrip("\n"))
        self.put_u32(nwritten_ptr, len(data))
        return WASI_SUCCESS

    def clock_time_get(self, clock_id: int, precision: int, ret: int) -> int:
        self.put_u64(ret, time.time_ns() if clock_id == 0 else time.monotonic_ns())
        return WASI_SUCCESS

    def random_get(self, ptr: int, size: int) -> int:
        self.write(ptr, os.urandom(size))
        return WASI_SUCCESS

    def environ_sizes_get(self, count_ptr: int, size_ptr: int) -> int:
        self.put_u32(count_ptr, 0)
        self.put_u32(size_ptr, 0)
        return WASI_SUCCESS

    def environ_get(self, environ: int, buf: int) -> int:
        return WASI_SUCCESS

    args_sizes_get = environ_sizes_get
    args_get = environ_get

    def proc_exit(self, code: int) -> None:
        raise ProcExit(f"guest called proc_exit({code})")
