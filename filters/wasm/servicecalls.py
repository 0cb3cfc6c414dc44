"""Host functions that reach past one call: metrics, shared data and queues, HTTP callouts.

State that must outlive an instance (metric values, shared data) lives in the Plugin or the
process-wide WasmRuntime, so a rebuilt instance after a trap sees it again.
"""

from __future__ import annotations

import struct

from .abi import PairsError, WasmResult, decode_pairs
from .hostcalls import HostCalls

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OK = int(WasmResult.OK)
_NOT_FOUND = int(WasmResult.NOT_FOUND)
_BAD_ARGUMENT = int(WasmResult.BAD_ARGUMENT)


class ServiceCalls(HostCalls):
    # -- metrics ------------------------------------------------------------------------

    def proxy_define_metric(self, metric_type: int, name_ptr: int, name_size: int, ret: int) -> int:
        if metric_type > 2:
            return _BAD_ARGUMENT
        name = self._read(name_ptr, name_size).decode("utf-8", "replace")
        self._put_u32(ret, self.plugin.metrics.define(metric_type, name))
        return _OK

    def proxy_increment_metric(self, metric_id: int, delta: int) -> int:
        return _OK if self.plugin.metrics.increment(metric_id, delta) else _NOT_FOUND

    def proxy_record_metric(self, metric_id: int, value: int) -> int:
        return _OK if self.plugin.metrics.record(metric_id, value) else _NOT_FOUND

    def proxy_get_metric(self, metric_id: int, ret: int) -> int:
        value = self.plugin.metrics.get(metric_id)
        if value is None:
            return _NOT_FOUND
        self._put_u64(ret, value)
        return _OK

    # -- shared data --------------------------------------------------------------------

    def proxy_set_shared_data(
        self, key_ptr: int, key_size: int, value_ptr: int, value_size: int, cas: int
    ) -> int:
        key = self._read(key_ptr, key_size)
        value = self._read(value_ptr, value_size)
        ok = self.plugin.runtime.shared.set(self.plugin.vm_id, key, value, cas)
        return _OK if ok else int(WasmResult.CAS_MISMATCH)

    def proxy_get_shared_data(
        self, key_ptr: int, key_size: int, ptr_ptr: int, size_ptr: int, cas_ptr: int
    ) -> int:
        found = self.plugin.runtime.shared.get(self.plugin.vm_id, self._read(key_ptr, key_size))
        if found is None:
            return _NOT_FOUND
        value, cas = found
        self._put_u32(cas_ptr, cas)
        return self._give(value, ptr_ptr, size_ptr)

    def proxy_register_shared_queue(self, name_ptr: int, name_size: int, ret: int) -> int:
        name = self._read(name_ptr, name_size)
        queue_id = self.plugin.runtime.shared.register_queue(
            self.plugin.vm_id, name, self.plugin.queue_ready
        )
        self._put_u32(ret, queue_id)
        return _OK

    def proxy_resolve_shared_queue(
        self, vm_ptr: int, vm_size: int, name_ptr: int, name_size: int, ret: int
    ) -> int:
        vm_id = self._read(vm_ptr, vm_size).decode("utf-8", "replace") or self.plugin.vm_id
        queue_id = self.plugin.runtime.shared.resolve_queue(vm_id, self._read(name_ptr, name_size))
        if queue_id is None:
            return _NOT_FOUND
        self._put_u32(ret, queue_id)
        return _OK

    def proxy_enqueue_shared_queue(self, queue_id: int, value_ptr: int, value_size: int) -> int:
        ok = self.plugin.runtime.shared.enqueue(queue_id, self._read(value_ptr, value_size))
        return _OK if ok else _NOT_FOUND

    def proxy_dequeue_shared_queue(self, queue_id: int, ptr_ptr: int, size_ptr: int) -> int:
        try:
            value = self.plugin.runtime.shared.dequeue(queue_id)
        except KeyError:
            return _NOT_FOUND
        if value is None:
            return int(WasmResult.EMPTY)
        return self._give(value, ptr_ptr, size_ptr)

    # -- HTTP callouts ------------------------------------------------------------------

    def proxy_http_call(
        self,
        upstream_ptr: int,
        upstream_size: int,
        headers_ptr: int,
        headers_size: int,
        body_ptr: int,
        body_size: int,
        trailers_ptr: int,
        trailers_size: int,
        timeout_ms: int,
        ret: int,
    ) -> int:
        upstream = self._read(upstream_ptr, upstream_size).decode("utf-8", "replace")
        try:
            headers = decode_pairs(self._read(headers_ptr, headers_size))
        except PairsError:
            return int(WasmResult.PARSE_FAILURE)
        names = {k.lower() for k, _ in headers}
        if not {b":authority", b":method", b":path"} <= names:
            return _BAD_ARGUMENT
        if self.plugin.resolve_upstream(upstream) is None:
            return _BAD_ARGUMENT  # neither a configured upstream nor host:port
        if not self.plugin.can_call_out():
            return int(WasmResult.INTERNAL_FAILURE)  # no event loop (a config check)
        token = self.plugin.http_call(
            self,
            upstream,
            headers,
            self._read(body_ptr, body_size),
            timeout_ms,
        )
        self._put_u32(ret, token)
        return _OK
