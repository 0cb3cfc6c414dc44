"""Host functions that reach past one call: metrics, shared data and queues, HTTP callouts.

State that must outlive an instance (metric values, shared data) lives in the Host (the
plugin) or the process-wide runtime, so a rebuilt instance after a trap sees it again.
`ServiceCalls` reads and writes guest memory through the instance's `HostCalls`.
"""

from __future__ import annotations

from .abi import PairsError, WasmResult, decode_pairs
from .host import Host
from .hostcalls import HostCalls

_OK = int(WasmResult.OK)
_NOT_FOUND = int(WasmResult.NOT_FOUND)
_BAD_ARGUMENT = int(WasmResult.BAD_ARGUMENT)


class ServiceCalls:
    def __init__(self, calls: HostCalls, host: Host) -> None:
        self.calls = calls
        self.host = host

    # -- metrics ------------------------------------------------------------------------

    def proxy_define_metric(self, metric_type: int, name_ptr: int, name_size: int, ret: int) -> int:
        if metric_type > 2:
            return _BAD_ARGUMENT
        name = self.calls.read(name_ptr, name_size).decode("utf-8", "replace")
        self.calls.put_u32(ret, self.host.metrics.define(metric_type, name))
        return _OK

    def proxy_increment_metric(self, metric_id: int, delta: int) -> int:
        return _OK if self.host.metrics.increment(metric_id, delta) else _NOT_FOUND

    def proxy_record_metric(self, metric_id: int, value: int) -> int:
        return _OK if self.host.metrics.record(metric_id, value) else _NOT_FOUND

    def proxy_get_metric(self, metric_id: int, ret: int) -> int:
        value = self.host.metrics.get(metric_id)
        if value is None:
            return _NOT_FOUND
        self.calls.put_u64(ret, value)
        return _OK

    # -- shared data --------------------------------------------------------------------

    def proxy_set_shared_data(
        self, key_ptr: int, key_size: int, value_ptr: int, value_size: int, cas: int
    ) -> int:
        key = self.calls.read(key_ptr, key_size)
        value = self.calls.read(value_ptr, value_size)
        ok = self.host.shared.set(self.host.vm_id, key, value, cas)
        return _OK if ok else int(WasmResult.CAS_MISMATCH)

    def proxy_get_shared_data(
        self, key_ptr: int, key_size: int, ptr_ptr: int, size_ptr: int, cas_ptr: int
    ) -> int:
        found = self.host.shared.get(self.host.vm_id, self.calls.read(key_ptr, key_size))
        if found is None:
            return _NOT_FOUND
        value, cas = found
        self.calls.put_u32(cas_ptr, cas)
        return self.calls.give(value, ptr_ptr, size_ptr)

    def proxy_register_shared_queue(self, name_ptr: int, name_size: int, ret: int) -> int:
        name = self.calls.read(name_ptr, name_size)
        queue_id = self.host.shared.register_queue(self.host.vm_id, name, self.host.queue_ready)
        self.calls.put_u32(ret, queue_id)
        return _OK

    def proxy_resolve_shared_queue(
        self, vm_ptr: int, vm_size: int, name_ptr: int, name_size: int, ret: int
    ) -> int:
        vm_id = self.calls.read(vm_ptr, vm_size).decode("utf-8", "replace") or self.host.vm_id
        queue_id = self.host.shared.resolve_queue(vm_id, self.calls.read(name_ptr, name_size))
        if queue_id is None:
            return _NOT_FOUND
        self.calls.put_u32(ret, queue_id)
        return _OK

    def proxy_enqueue_shared_queue(self, queue_id: int, value_ptr: int, value_size: int) -> int:
        ok = self.host.shared.enqueue(queue_id, self.calls.read(value_ptr, value_size))
        return _OK if ok else _NOT_FOUND

    def proxy_dequeue_shared_queue(self, queue_id: int, ptr_ptr: int, size_ptr: int) -> int:
        try:
            value = self.host.shared.dequeue(queue_id)
        except KeyError:
            return _NOT_FOUND
        if value is None:
            return int(WasmResult.EMPTY)
        return self.calls.give(value, ptr_ptr, size_ptr)

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
        upstream = self.calls.read(upstream_ptr, upstream_size).decode("utf-8", "replace")
        try:
            headers = decode_pairs(self.calls.read(headers_ptr, headers_size))
        except PairsError:
            return int(WasmResult.PARSE_FAILURE)
        names = {k.lower() for k, _ in headers}
        if not {b":authority", b":method", b":path"} <= names:
            return _BAD_ARGUMENT
        if self.host.resolve_upstream(upstream) is None:
            return _BAD_ARGUMENT  # neither a configured upstream nor host:port
        if not self.host.can_call_out():
            return int(WasmResult.INTERNAL_FAILURE)  # no event loop (a config check)
        token = self.host.http_call(
            self.calls,
            upstream,
            headers,
            self.calls.read(body_ptr, body_size),
            timeout_ms,
        )
        self.calls.put_u32(ret, token)
        return _OK
