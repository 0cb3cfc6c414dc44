"""One instance of a filter module: links every import, finds the callbacks, and drives
them with the CPU deadline set and the active context recorded.

The host functions it links belong to two objects it owns: `HostCalls` (the instance's
memory and contexts) and `ServiceCalls` (metrics, shared data, callouts), both reaching
the plugin only through the `Host` protocol.

A WasmVM is used until a callback traps; then its owner (plugin.py) throws it away and a
fresh one serves the next call, so no state from a broken instance is ever read again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import wasmtime

from . import fused as fusing
from . import native
from .abi import ABI_MARKERS, PROXY_FUNCS, WASI_FUNCS, WASI_MODULES, WASI_NOTSUP, WasmResult
from .context import CalloutResponse, HttpStream
from .fused import Fused
from .host import Owner
from .hostcalls import HostCalls
from .servicecalls import ServiceCalls

log = logging.getLogger("sidecar.wasm")

Callback = Callable[..., int]
_U64_MASK = (1 << 64) - 1
# How many arguments the host passes each export it calls (ABI 0.2.x; 0.1.0's header
# callbacks take two). An export declared otherwise still gets called, loosely.
_ARGS = {
    "malloc": 1,
    "proxy_on_memory_allocate": 1,
    "_initialize": 0,
    "_start": 0,
    "main": 2,
    "proxy_on_context_create": 2,
    "proxy_on_vm_start": 2,
    "proxy_on_configure": 2,
    "proxy_on_tick": 1,
    "proxy_on_request_headers": 3,
    "proxy_on_request_body": 3,
    "proxy_on_request_trailers": 2,
    "proxy_on_response_headers": 3,
    "proxy_on_response_body": 3,
    "proxy_on_response_trailers": 2,
    "proxy_on_done": 1,
    "proxy_on_log": 1,
    "proxy_on_delete": 1,
    "proxy_on_http_call_response": 5,
    "proxy_on_queue_ready": 2,
}


def _host_args(abi: str, name: str, default: int) -> int:
    if abi == "0.1.0" and name in ("proxy_on_request_headers", "proxy_on_response_headers"):
        return 2
    return _ARGS.get(name, default)


class LoadError(Exception):
    """The module cannot serve as a proxy-wasm filter (no ABI marker, no memory, ...)."""


def abi_version(module: wasmtime.Module) -> str | None:
    names = {export.name for export in module.exports}
    for marker, version in ABI_MARKERS.items():
        if marker in names:
            return version
    return None


def _signature(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def implemented(module_name: str, name: str, ty: wasmtime.FuncType) -> bool:
    """Whether this host serves `module_name.name` with the shape the module declares."""
    if module_name == "env":
        table = PROXY_FUNCS
    elif module_name in WASI_MODULES:
        table = WASI_FUNCS
    else:
        return False
    return table.get(name) == _signature(ty)


class WasmVM:
    def __init__(self, plugin: Owner, module: wasmtime.Module) -> None:
        self.plugin = plugin
        self.abi = abi_version(module) or ""
        if not self.abi:
            raise LoadError(
                "no proxy_abi_version_0_2_1/_0_2_0/_0_1_0 export: not a proxy-wasm module"
            )
        self.min_level = plugin.min_log_level
        calls = self.calls = HostCalls(plugin, self.abi, self.min_level)
        services = ServiceCalls(calls, plugin)
        self.root_id = calls.root_id
        self.streams = calls.streams  # the same dict: the instance's HTTP contexts
        self.broken = False
        self._next_id = 2
        self._raised: list[BaseException] = []
        self._keep: list[Any] = []  # ctypes callbacks must outlive the store
        use_native = plugin.native and native.available()

        store = wasmtime.Store(plugin.engine)
        store.set_limits(memory_size=plugin.max_memory_bytes)
        self.store = store
        self._set_deadline = native.epoch_deadline_setter(store, use_native)
        self._ticks = plugin.deadline_ticks
        self._runtime = plugin.runtime
        self._deadline_epoch = -1
        self._set_deadline(self._ticks)  # the start function runs inside instantiate
        linker = wasmtime.Linker(plugin.engine)
        define = native.define_host_func if use_native else native.define_public_host_func
        for imp in module.imports:
            ty = imp.type
            if not isinstance(ty, wasmtime.FuncType):
                raise LoadError(f"imports {imp.module}.{imp.name}, which is not a function")
            name = imp.name or ""
            fn: Callable[..., int | None]
            if implemented(imp.module, name, ty):
                fn = getattr(calls, name, None) or getattr(services, name)
            else:
                fn = self._stub(imp.module, name, ty)
            if use_native and imp.module == "env" and name == "proxy_log" and fn == calls.proxy_log:
                self._link_log_gate(linker, store, ty)
                continue
            define(linker, imp.module, name, ty, fn, self._raised, self._keep)
        try:
            instance = linker.instantiate(store, module)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise native.WasmCallError(f"instantiation failed: {exc}") from None
        exports = instance.exports(store)
        memory = exports.get("memory") if "memory" in exports else None
        if not isinstance(memory, wasmtime.Memory):
            raise LoadError("the module exports no memory named 'memory'")
        calls.mem = (native.RawMemory if use_native else native.PublicMemory)(store, memory)

        def export(name: str) -> Callback | None:
            func = exports.get(name)
            if not isinstance(func, wasmtime.Func):
                return None
            ty = func.type(store)
            params = len(ty.params)
            arity = max(params, len(ty.results))
            if use_native:
                exact = params == _host_args(self.abi, name, params)
                return native.export_caller(
                    store, func, name, params, arity, self._raised, exact=exact
                )
            return native.PublicExportCaller(store, func, name, arity, self._raised)

        self.export = export
        calls.malloc = export("malloc") or export("proxy_on_memory_allocate")
        if "_initialize" in exports:
            self._run_start(export("_initialize"))
            main = export("main")
            if main is not None:
                self._run_start(main, 0, 0)
        elif "_start" in exports:
            self._run_start(export("_start"))
        self.cb_context_create = export("proxy_on_context_create")
        self.cb_vm_start = export("proxy_on_vm_start")
        self.cb_configure = export("proxy_on_configure")
        self.cb_tick = export("proxy_on_tick")
        self.cb_request_headers = export("proxy_on_request_headers")
        self.cb_request_body = export("proxy_on_request_body")
        self.cb_request_trailers = export("proxy_on_request_trailers")
        self.cb_response_headers = export("proxy_on_response_headers")
        self.cb_response_body = export("proxy_on_response_body")
        self.cb_response_trailers = export("proxy_on_response_trailers")
        self.cb_done = export("proxy_on_done")
        self.cb_log = export("proxy_on_log")
        self.cb_delete = export("proxy_on_delete")
        self.cb_http_call_response = export("proxy_on_http_call_response")
        self.cb_queue_ready = export("proxy_on_queue_ready")
        # 0.1.0 header callbacks take (context, num_headers); 0.2.x adds end_of_stream.
        self.headers_take_eos = self.abi != "0.1.0"
        self.fused = calls.fused = self._link_fused(store, exports) if use_native else None

    def _link_fused(self, store: wasmtime.Store, exports: Any) -> Fused | None:
        callbacks = {}
        for name in fusing.CALLBACKS:
            func = exports.get(name)
            if isinstance(func, wasmtime.Func):
                callbacks[name] = func
        plan = fusing.plan(self.abi, {name: f.type(store) for name, f in callbacks.items()})
        if plan is None:
            return None
        module = self._runtime.driver(plan.wat)
        driver = Fused(
            plan, module, store, callbacks, self.refresh_deadline, self._raised, self._keep
        )
        driver.epochs[fusing.DEADLINE_EPOCH // 8] = self._deadline_epoch & _U64_MASK
        self._runtime.watch_epoch(id(self), driver.epochs, store)
        return driver

    def release(self) -> None:
        """The instance serves no more calls (it trapped, or its plugin let it go)."""
        self._runtime.unwatch_epoch(id(self))

    def _link_log_gate(
        self, linker: wasmtime.Linker, store: wasmtime.Store, ty: wasmtime.FuncType
    ) -> None:
        """Link env.proxy_log to a wasm function that drops messages below the log level.

        SDKs log a lot at debug level (the AssemblyScript SDK ~10 times per request), and
        crossing into Python only to drop a message costs more than the rest of the call;
        the gate answers those in wasm and crosses only for messages that will be logged.
        """
        gate = self.plugin.runtime.log_gate(self.min_level)
        native.define_host_func(
            linker, "opus_host", "proxy_log", ty, self.calls.proxy_log, self._raised, self._keep
        )
        instance = linker.instantiate(store, gate)
        linker.define(store, "env", "proxy_log", instance.exports(store)["proxy_log"])

    def _stub(self, module: str, name: str, ty: wasmtime.FuncType) -> Callable[..., int | None]:
        plugin = self.plugin
        answer = WASI_NOTSUP if module in WASI_MODULES else int(WasmResult.UNIMPLEMENTED)
        has_result = bool(ty.results)

        def unimplemented(*_args: int) -> int | None:
            plugin.note_unimplemented(f"{module}.{name}")
            return answer if has_result else None

        return unimplemented

    def _run_start(self, func: Callback | None, *args: int) -> None:
        if func is not None:
            self._set_deadline(self._ticks)
            self._deadline_epoch = self._runtime.epoch
            func(*args)

    # -- driving callbacks ----------------------------------------------------------------

    def invoke(self, callback: Callback, context_id: int, *args: int) -> int:
        """Run one callback as `context_id`; WasmCallError (a trap) breaks the instance."""
        calls = self.calls
        calls.active_id = context_id
        calls.effective_id = 0
        # The deadline is `ticks` past the epoch when it was set; while the epoch has not
        # moved since, the one set for an earlier callback still grants the whole budget.
        epoch = self._runtime.epoch
        if epoch != self._deadline_epoch:
            self.refresh_deadline()
        try:
            return callback(context_id, *args)
        except native.WasmCallError:
            self.broken = True
            raise
        finally:
            calls.active_id = 0
            calls.effective_id = 0

    def start(self) -> bool:
        """Create the root context, then vm_start and configure (cpp-host's order)."""
        root = self.root_id
        if self.cb_context_create is not None:
            self.invoke(self.cb_context_create, root, 0)
        vm_config = len(self.plugin.vm_configuration)
        if self.cb_vm_start is not None and not self.invoke(self.cb_vm_start, root, vm_config):
            return False
        config = len(self.plugin.configuration)
        return self.cb_configure is None or bool(self.invoke(self.cb_configure, root, config))

    def refresh_deadline(self) -> None:
        """A fresh deadline (for the next callback, or one the driver starts)."""
        epoch = self._runtime.epoch
        self._set_deadline(self._ticks)
        self._deadline_epoch = epoch
        if self.fused is not None:
            self.fused.epochs[fusing.DEADLINE_EPOCH // 8] = epoch

    def _fused_failed(self, exc: native.WasmCallError, names: tuple[str, ...]) -> Exception:
        """A trap in a fused call, reported as the callback's that trapped."""
        self.broken = True
        message = str(exc)
        assert self.fused is not None
        for export in ("begin: ", "finish: ", "close: "):
            if message.startswith(export):
                message = f"{self.fused.callback_name(names)}: {message[len(export) :]}"
                break
        error = native.WasmCallError(message)
        error.__cause__ = exc.__cause__
        return error

    def http_call_response(self, token: int, response: CalloutResponse | None) -> None:
        """Deliver a callout's reply to the root context (WasmCallError: a trap)."""
        callback = self.cb_http_call_response
        if callback is None:
            return
        if response is None:
            counts = (0, 0, 0)
        else:
            counts = (len(response.headers), len(response.body), len(response.trailers))
        self.calls.callout = response
        try:
            self.invoke(callback, self.root_id, token, *counts)
        finally:
            self.calls.callout = None

    def new_stream(self) -> HttpStream:
        stream = HttpStream(self._next_id)
        self._next_id += 1
        self.streams[stream.id] = stream
        return stream

    # The fused paths below do what invoke() does, inline: on this path every Python call
    # layer costs about as much as the callbacks of a simple filter.

    def begin(self, stream: HttpStream, count: int, eos: bool) -> int:
        """on_context_create, then, with the staged request shown, on_request_headers;
        returns that callback's action (0 when the module has none)."""
        driver = self.fused
        fused = driver.begin if driver is not None else None
        if fused is None:
            if self.cb_context_create is not None:
                self.invoke(self.cb_context_create, stream.id, self.root_id)
            stream.show_request()
            if self.cb_request_headers is None:
                return 0
            return self.headers_callback(self.cb_request_headers, stream, count, eos)
        assert driver is not None
        calls = self.calls
        context = calls.active_id = stream.id
        calls.effective_id = 0
        calls.staging = stream  # shown once the driver reaches on_request_headers
        if self._runtime.epoch != self._deadline_epoch:
            self.refresh_deadline()
        try:
            if self.headers_take_eos:
                return fused(context, self.root_id, count, eos)
            return fused(context, self.root_id, count)
        except native.WasmCallError as exc:
            raise self._fused_failed(exc, driver.plan.begin) from exc.__cause__
        finally:
            calls.active_id = calls.effective_id = 0
            calls.staging = None
            stream.show_request()

    def finish(self, stream: HttpStream, count: int, eos: bool, may_end: bool) -> int:
        """on_response_headers; when `may_end` (no body callback follows) and it lets the
        stream go on (action 0), also the stream's end (on_done, on_log, on_delete) in the
        same call into wasm."""
        driver = self.fused
        fused = driver.finish if driver is not None and may_end else None
        if fused is None:
            assert self.cb_response_headers is not None
            return self.headers_callback(self.cb_response_headers, stream, count, eos)
        assert driver is not None
        words = driver.words
        calls = self.calls
        context = calls.active_id = stream.id
        calls.effective_id = 0
        if self._runtime.epoch != self._deadline_epoch:
            self.refresh_deadline()
        try:
            action = fused(context, count, eos) if self.headers_take_eos else fused(context, count)
        except native.WasmCallError as exc:
            error = self._fused_failed(exc, driver.plan.finish)
            if words[fusing.STEP // 4] < 2:
                raise error from exc.__cause__
            # The end trapped, after the headers went well: reported when the stream
            # closes, as a trap in close_stream is.
            stream.ended = True
            stream.end_error = error
            return 0
        finally:
            calls.active_id = calls.effective_id = 0
        if words[fusing.STEP // 4] > 1:
            stream.ended = True
        return action

    def close_stream(self, stream: HttpStream) -> None:
        """on_done, then on_log and on_delete (the Go SDK's proxytest ends a stream so)."""
        try:
            if stream.end_error is not None:
                raise stream.end_error
            if self.broken or stream.ended:
                return
            driver = self.fused
            if driver is not None and driver.close is not None:
                try:
                    self.invoke(driver.close, stream.id)
                except native.WasmCallError as exc:
                    raise self._fused_failed(exc, driver.plan.close) from exc.__cause__
                return
            if self.cb_done is not None:
                self.invoke(self.cb_done, stream.id)
            if self.cb_log is not None:
                self.invoke(self.cb_log, stream.id)
            if self.cb_delete is not None:
                self.invoke(self.cb_delete, stream.id)
        finally:
            self.streams.pop(stream.id, None)

    def headers_callback(
        self, callback: Callback, stream: HttpStream, count: int, eos: bool
    ) -> int:
        if self.headers_take_eos:
            return self.invoke(callback, stream.id, count, int(eos))
        return self.invoke(callback, stream.id, count)
