"""The `wasm` filter: runs a proxy-wasm module (built with a proxy-wasm SDK, or WAT) on
each call, mapping the ABI's callbacks onto the chain's request and response.

    {name: wasm, config: {path: filter.wasm, root_id: ..., configuration: ...,
                          fail_open: false, max_cpu_ms: 100, max_memory_mb: 64}}

A callback that traps (runs past max_cpu_ms, touches memory out of bounds, exceeds
max_memory_mb, calls proc_exit) costs its instance; the call is answered 500 (fail closed)
or passes untouched (fail open), and a fresh instance serves the next call.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.sdk import (
    Call,
    Filter,
    FilterContext,
    FilterFactory,
    FilterFailed,
    Headers,
    Next,
    Response,
    fixed_body,
    read_response_body,
)

from .abi import LogLevel, MapType
from .cache import wasm_bytes
from .context import HttpStream, dirty_bit
from .diagnose import Misconfigured
from .metrics import export_to
from .native import WasmCallError
from .plugin import Plugin, PluginSettings, Unavailable
from .runtime import WasmRuntime, shared_runtime
from .vm import LoadError, WasmVM

PAUSE_LIMIT_S = 30.0  # a paused call waits this long for proxy_continue_stream
_REQ = int(MapType.HTTP_REQUEST_HEADERS)
_REQ_TRAILERS = int(MapType.HTTP_REQUEST_TRAILERS)
_RESP = int(MapType.HTTP_RESPONSE_HEADERS)
_RESP_TRAILERS = int(MapType.HTTP_RESPONSE_TRAILERS)
_REQ_DIRTY = dirty_bit(_REQ)
_REQ_TRAILERS_DIRTY = dirty_bit(_REQ_TRAILERS)
_RESP_DIRTY = dirty_bit(_RESP)
_RESP_TRAILERS_DIRTY = dirty_bit(_RESP_TRAILERS)
_REQ_BODY_DIRTY = dirty_bit(-1)
_RESP_BODY_DIRTY = dirty_bit(-2)


@dataclass(frozen=True, slots=True)
class WasmConfig:
    path: str
    name: str = ""  # in logs, metric labels and plugin_name; default: root_id or file name
    root_id: str = ""
    configuration: Any = ""  # a string, or a mapping/list passed as JSON text
    vm_configuration: str = ""
    vm_id: str = ""
    fail_open: bool = False
    max_cpu_ms: int = 100
    max_memory_mb: int = 64
    buffer_bodies: bool = False  # deliver whole bodies to on_*_body (breaks streaming)
    upstreams: dict[str, str] = field(default_factory=dict)  # proxy_http_call names -> URLs
    log_level: str = "info"  # guest logs below this are dropped before they are decoded
    cache_dir: str = ""  # compiled-module cache; default $XDG_CACHE_HOME/opus-mesh/wasm

    def plugin_name(self) -> str:
        return self.name or self.root_id or Path(self.path).stem

    def configuration_bytes(self) -> bytes:
        value = self.configuration
        if isinstance(value, str):
            return value.encode()
        return json.dumps(value, separators=(",", ":")).encode()

    def validate(self) -> None:
        if self.max_cpu_ms <= 0:
            raise ValueError("max_cpu_ms: must be above 0")
        if self.max_memory_mb <= 0:
            raise ValueError("max_memory_mb: must be above 0")
        if self.log_level.upper() not in LogLevel.__members__:
            raise ValueError(f"log_level: must be one of {', '.join(LogLevel.__members__).lower()}")
        if self.configuration is not None and not isinstance(self.configuration, str | dict | list):
            raise ValueError("configuration: must be a string or a mapping (sent as JSON)")
        # Compile (into the cache) and start one instance now, so a bad module or a
        # configuration the filter rejects stops the sidecar before it binds a port.
        plugin = load_plugin(self, FilterContext("inbound", "check"), self.plugin_name())
        try:
            plugin.acquire()
        except Misconfigured as exc:
            raise ValueError(f"{exc.key}: the filter failed to start: {exc}") from None
        except (WasmCallError, LoadError, Unavailable) as exc:
            raise ValueError(f"path: {self.path}: the filter failed to start: {exc}") from None
        finally:
            plugin.close()


def _runtime(config: WasmConfig, ctx: FilterContext) -> WasmRuntime:
    given = ctx.extra.get("wasm_runtime")
    if isinstance(given, WasmRuntime):
        return given
    return shared_runtime(Path(config.cache_dir) if config.cache_dir else None)


def load_plugin(config: WasmConfig, ctx: FilterContext, name: str, native: bool = True) -> Plugin:
    path = Path(config.path)
    try:
        wasm = wasm_bytes(path)
    except OSError as exc:
        raise ValueError(f"path: cannot read {config.path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"path: {exc}") from None
    except Exception as exc:  # wat2wasm reports bad text as WasmtimeError
        raise ValueError(f"path: {config.path} is not valid WebAssembly text: {exc}") from None
    runtime = _runtime(config, ctx)
    try:
        module = runtime.cache.load(wasm)
    except Exception as exc:
        raise ValueError(f"path: {config.path} is not a WebAssembly module: {exc}") from None
    settings = PluginSettings(
        name=name,
        root_id=config.root_id,
        configuration=config.configuration_bytes(),
        vm_configuration=config.vm_configuration.encode(),
        vm_id=config.vm_id,
        max_cpu_ms=config.max_cpu_ms,
        max_memory_mb=config.max_memory_mb,
        service_name=ctx.service_name,
        direction=ctx.direction,
        upstreams=dict(config.upstreams),
        native=native,
        min_log_level=int(LogLevel[config.log_level.upper()]),
    )
    return Plugin(settings, module, runtime)


class WasmFilter(Filter):
    def __init__(self, plugin: Plugin, fail_open: bool, buffer_bodies: bool) -> None:
        self.plugin = plugin
        self.fail_open = fail_open
        self.buffer_bodies = buffer_bodies

    def close(self) -> None:
        self.plugin.close()

    async def handle(self, call: Call, next: Next) -> Response:
        plugin = self.plugin
        vm = plugin.vm
        try:
            if vm is None or vm.broken:
                vm = plugin.acquire()
            if plugin.tick_period:
                plugin.arm_tick()
            stream = vm.new_stream()
        except (WasmCallError, LoadError, Unavailable) as exc:
            if plugin.vm is not None:
                plugin.trapped(plugin.vm, exc)
            return await self._failed(call, next, exc)
        try:
            try:
                # The common case (no pause, local reply or body callback) stays synchronous.
                action = self._request_headers(vm, stream, call)
                if action is None:
                    reply = None
                    if stream.dirty:
                        self._write_request(stream, call)
                else:
                    reply = await self._request(vm, stream, call, action)
            except WasmCallError as exc:
                plugin.trapped(vm, exc)
                return await self._failed(call, next, exc)
            if reply is not None:
                call.note_local_reply(self.name)
                return reply
            response = await next(call)
            try:
                action = self._response_headers(vm, stream, call, response)
                if action is None:
                    if stream.dirty:
                        self._write_response(stream, response)
                    return response
                return await self._response(vm, stream, call, response, action)
            except WasmCallError as exc:
                plugin.trapped(vm, exc)
                if self.fail_open:
                    return response
                response.body.cancel()
                raise self._error(exc) from None
        finally:
            if stream.ended and stream.end_error is None:
                vm.streams.pop(stream.id, None)  # what close_stream would do
            else:
                try:
                    vm.close_stream(stream)
                except WasmCallError as exc:
                    plugin.trapped(vm, exc)

    def _error(self, exc: BaseException) -> FilterFailed:
        return FilterFailed(f"wasm filter {self.name!r} failed: {exc}")

    async def _failed(self, call: Call, next: Next, exc: BaseException) -> Response:
        if self.fail_open:
            return await next(call)
        raise self._error(exc)

    # -- request --------------------------------------------------------------------------

    def _request_headers(self, vm: WasmVM, stream: HttpStream, call: Call) -> int | None:
        """on_context_create, then on_request_headers (one call into wasm when fused);
        the action for _request, or None when the request phase is over."""
        count = stream.stage_request(call)
        action = vm.begin(stream, count, call.request.body.buffered_whole == b"")
        if (
            action
            or self.buffer_bodies
            or stream.local_reply is not None
            or stream.closed
            or stream.continued
        ):
            return action
        return None

    async def _request(
        self, vm: WasmVM, stream: HttpStream, call: Call, action: int
    ) -> Response | None:
        req = call.request
        body = vm.cb_request_body if self.buffer_bodies else None
        if vm.cb_request_headers is not None:
            reply = await self._settle(vm, stream, action, call)
            if reply is not None:
                return reply
        if body is not None:
            stream.request_body = await call.read_body()
            action = vm.invoke(body, stream.id, len(stream.request_body), 1)
            reply = await self._settle(vm, stream, action, call)
            if reply is not None:
                return reply
            trailers = req.body.trailers
            if trailers and vm.cb_request_trailers is not None:
                stream.maps[_REQ_TRAILERS] = list(trailers)
                action = vm.invoke(vm.cb_request_trailers, stream.id, len(trailers))
                reply = await self._settle(vm, stream, action, call)
                if reply is not None:
                    return reply
        if stream.dirty:
            self._write_request(stream, call)
        return None

    def _write_request(self, stream: HttpStream, call: Call) -> None:
        req = call.request
        dirty = stream.dirty
        if dirty & _REQ_DIRTY:
            plain = stream.request_plain
            if plain is not None:  # the map was never built: only ordinary headers changed
                req.headers[:] = plain
            else:
                rebuilt: Headers = []
                for name, value in stream.maps[_REQ]:
                    if name == b":path":
                        call.path = value
                    elif name == b":authority":
                        call.authority = value
                    elif name == b":method":
                        req.method = value
                    elif not name.startswith(b":"):
                        rebuilt.append((name, value))
                req.headers[:] = rebuilt
        if dirty & _REQ_BODY_DIRTY:
            call.set_body(stream.request_body)
        if dirty & _REQ_TRAILERS_DIRTY:
            req.body.trailers = stream.maps[_REQ_TRAILERS]
        stream.dirty = 0

    # -- response -------------------------------------------------------------------------

    def _response_headers(
        self, vm: WasmVM, stream: HttpStream, call: Call, response: Response
    ) -> int | None:
        """on_response_headers and, if nothing else is to come, the stream's end (fused);
        the action for _response, or None when the response phase is over."""
        stream.endpoint = call.endpoint
        count = stream.begin_response(response.status, response.headers)
        body = vm.cb_response_body if self.buffer_bodies else None
        if vm.cb_response_headers is None:
            return None if body is None else 0
        empty = response.body.buffered_whole == b""
        action = vm.finish(stream, count, empty, may_end=body is None)
        if (
            action
            or body is not None
            or stream.local_reply is not None
            or stream.closed
            or stream.continued
        ):
            return action
        return None

    async def _response(
        self, vm: WasmVM, stream: HttpStream, call: Call, response: Response, action: int
    ) -> Response:
        if vm.cb_response_headers is not None:
            reply = await self._settle(vm, stream, action, call)
            if reply is not None:
                response.body.cancel()
                return reply
        body = vm.cb_response_body if self.buffer_bodies else None
        if body is not None:
            stream.response_body = await read_response_body(response, call.max_body_bytes)
            action = vm.invoke(body, stream.id, len(stream.response_body), 1)
            reply = await self._settle(vm, stream, action, call)
            if reply is not None:
                return reply
            trailers = response.body.trailers
            if trailers and vm.cb_response_trailers is not None:
                stream.maps[_RESP_TRAILERS] = list(trailers)
                action = vm.invoke(vm.cb_response_trailers, stream.id, len(trailers))
                reply = await self._settle(vm, stream, action, call)
                if reply is not None:
                    return reply
        if stream.dirty:
            self._write_response(stream, response)
        return response

    def _write_response(self, stream: HttpStream, response: Response) -> None:
        dirty = stream.dirty
        if dirty & _RESP_DIRTY:
            plain = stream.response_plain
            if plain is not None:  # the map was never built: only ordinary headers changed
                response.headers[:] = plain
            else:
                rebuilt: Headers = []
                for name, value in stream.maps[_RESP]:
                    if name == b":status":
                        if value.isdigit():
                            response.status = int(value)
                    elif not name.startswith(b":"):
                        rebuilt.append((name, value))
                response.headers[:] = rebuilt
        if dirty & (_RESP_BODY_DIRTY | _RESP_TRAILERS_DIRTY):
            trailers = stream.maps.get(_RESP_TRAILERS, response.body.trailers)
            response.body = fixed_body(stream.response_body, trailers)
            response.headers[:] = [(n, v) for n, v in response.headers if n != b"content-length"]
            response.headers.append((b"content-length", b"%d" % len(stream.response_body)))
        stream.dirty = 0

    # -- pause, resume, local replies ------------------------------------------------------

    async def _settle(
        self, vm: WasmVM, stream: HttpStream, action: int, call: Call
    ) -> Response | None:
        """A local reply wins over the action (as in cpp-host); a pause waits for the guest
        to continue, close or answer the stream (from a tick or a callout response)."""
        if stream.local_reply is None and action != 0 and not stream.continued:
            stream.resumed = asyncio.Event()
            limit = PAUSE_LIMIT_S
            if call.deadline is not None:
                limit = max(0.0, min(limit, call.deadline - time.monotonic()))
            try:
                await asyncio.wait_for(stream.resumed.wait(), limit)
            except TimeoutError:
                raise WasmCallError("the stream stayed paused past its limit") from None
            finally:
                stream.resumed = None
            if vm.broken:
                raise WasmCallError("the instance trapped while the stream was paused")
        stream.continued = False
        local = stream.local_reply
        if local is not None:
            stream.local_reply = None
            headers = list(local.headers)
            if local.grpc_status >= 0 and call.request.is_grpc:
                headers.append((b"grpc-status", b"%d" % local.grpc_status))
            return call.reply(local.status, local.body, headers)
        if stream.closed:
            return call.reply(503, b"stream closed by the wasm filter\n")
        return None


def _build(config: WasmConfig, ctx: FilterContext) -> Filter:
    plugin = load_plugin(config, ctx, config.plugin_name())
    if ctx.metrics is not None:
        export_to(ctx.metrics, plugin.metrics)
    return WasmFilter(plugin, config.fail_open, config.buffer_bodies)


factory = FilterFactory(WasmConfig, _build)
