"""A configured filter module: its compiled code, settings and long-lived state, and the
instance currently serving it (rebuilt after a trap).

Also owns what outlives one callback: the tick timer, HTTP callouts, guest logs, and the
set of unimplemented imports already reported.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from .context import CalloutResponse
from .diagnose import REJECTED, misconfigured
from .metrics import PluginMetrics
from .native import WasmCallError
from .runtime import SharedData, WasmRuntime
from .vm import WasmVM

log = logging.getLogger("sidecar.wasm")

MAX_BACKOFF_S = 5.0


class Unavailable(Exception):
    """No healthy instance right now (the last ones failed to start)."""


@dataclass(frozen=True, slots=True)
class PluginSettings:
    name: str
    root_id: str
    configuration: bytes
    vm_configuration: bytes = b""
    vm_id: str = ""
    max_cpu_ms: int = 100
    max_memory_mb: int = 64
    service_name: str = ""
    direction: str = ""
    upstreams: dict[str, str] = field(default_factory=dict)
    native: bool = True  # the raw C-API boundary (see native.py); False: public API only
    min_log_level: int = 0


class Plugin:
    """A configured filter module; the `Host` (host.py) its instances' host functions use."""

    name: str
    root_id: str
    vm_id: str
    service_name: str
    direction: str
    configuration: bytes
    vm_configuration: bytes

    def __init__(
        self,
        settings: PluginSettings,
        module: wasmtime.Module,
        runtime: WasmRuntime,
        log_sink: Callable[[int, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.module = module
        self.runtime = runtime
        self.engine = runtime.engine
        self.name = settings.name
        self.root_id = settings.root_id
        self.vm_id = settings.vm_id
        self.configuration = settings.configuration
        self.vm_configuration = settings.vm_configuration
        self.service_name = settings.service_name
        self.direction = settings.direction
        self.native = settings.native
        self.min_log_level = settings.min_log_level
        self.max_memory_bytes = settings.max_memory_mb << 20
        self.deadline_ticks = runtime.deadline_ticks(settings.max_cpu_ms)
        self.properties: dict[str, bytes] = {}
        self.metrics = PluginMetrics(settings.name)
        self.log_sink = log_sink
        self.unimplemented: set[str] = set()
        self._start_logs: list[str] | None = None  # guest logs while an instance starts
        self.vm: WasmVM | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.tick_period = 0.0  # seconds; 0: no ticks
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tokens = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        runtime.ensure_ticker()

    @property
    def shared(self) -> SharedData:
        return self.runtime.shared

    # -- instances ------------------------------------------------------------------------

    def acquire(self) -> WasmVM:
        """The serving instance; a fresh one when the last trapped (rate-limited only when
        instances keep failing to start)."""
        vm = self.vm
        if vm is not None and not vm.broken:
            return vm
        self.drop()
        now = time.monotonic()
        if now < self._retry_at:
            raise Unavailable(f"wasm filter {self.name!r} is restarting")
        vm = None
        logs: list[str] = []
        self._start_logs = logs
        try:
            vm = WasmVM(self, self.module)
            self.metrics.instances += 1
            if not vm.start():
                raise WasmCallError(REJECTED)
        except Exception as exc:
            if vm is not None:
                vm.release()
            self._failures += 1
            self._retry_at = now + min(MAX_BACKOFF_S, 0.05 * 2 ** (self._failures - 1))
            self.metrics.traps += 1
            cause = misconfigured(exc, logs, self.root_id, self.configuration)
            if cause is not None:
                raise cause from exc
            raise
        finally:
            self._start_logs = None
        self._failures = 0
        self.vm = vm
        return vm

    def drop(self) -> None:
        """Forget the current instance (after a trap): its contexts and timers die with it."""
        if self.vm is not None:
            self.vm.release()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self.tick_period = 0.0
        self.vm = None

    def trapped(self, vm: WasmVM, exc: BaseException) -> None:
        self.metrics.traps += 1
        log.warning("wasm filter %r trapped; its instance is replaced: %s", self.name, exc)
        vm.broken = True
        vm.release()
        for stream in vm.streams.values():
            stream.resume()  # a call paused on this instance learns of the trap now
        if self.vm is vm:
            self.drop()

    def close(self) -> None:
        self.drop()
        for task in self._tasks:
            task.cancel()

    # -- logs and unimplemented imports -------------------------------------------------

    def guest_log(self, level: int, message: str) -> None:
        if self._start_logs is not None:
            self._start_logs.append(message)
        if self.log_sink is not None:
            self.log_sink(level, message)
        log.log(level, "wasm filter %s: %s", self.name, message)

    def note_unimplemented(self, name: str) -> None:
        self.metrics.unimplemented_calls += 1
        if name not in self.unimplemented:
            self.unimplemented.add(name)
            log.warning(
                "wasm filter %r called %s, which this host does not implement "
                "(answered UNIMPLEMENTED; reported once)",
                self.name,
                name,
            )

    # -- ticks ----------------------------------------------------------------------------

    def set_tick_period(self, period_ms: int) -> None:
        self.tick_period = period_ms / 1000
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self.arm_tick()

    def arm_tick(self) -> None:
        """Schedule the next proxy_on_tick (called again once a loop runs, if none did)."""
        if self.tick_period <= 0 or self._tick_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._tick_handle = loop.call_later(self.tick_period, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_handle = None
        vm = self.vm
        if vm is None or vm.broken or vm.cb_tick is None:
            return
        try:
            vm.invoke(vm.cb_tick, vm.root_id)
        except WasmCallError as exc:
            self.trapped(vm, exc)
            return
        self.arm_tick()

    # -- shared queues --------------------------------------------------------------------

    def queue_ready(self, queue_id: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_soon(self._deliver_queue, queue_id)

    def _deliver_queue(self, queue_id: int) -> None:
        vm = self.vm
        if vm is None or vm.broken or vm.cb_queue_ready is None:
            return
        try:
            vm.invoke(vm.cb_queue_ready, vm.root_id, queue_id)
        except WasmCallError as exc:
            self.trapped(vm, exc)

    # -- HTTP callouts --------------------------------------------------------------------

    def resolve_upstream(self, upstream: str) -> str | None:
        if upstream in self.settings.upstreams:
            return self.settings.upstreams[upstream].rstrip("/")
        host, sep, port = upstream.rpartition(":")
        if sep and host and port.isdigit():
            return f"http://{upstream}"
        return None

    def can_call_out(self) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def http_call(
        self,
        caller: object,
        upstream: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout_ms: int,
    ) -> int:
        """Start the callout; its response comes back to the root context (as in cpp-host),
        where SDKs switch to the calling stream with proxy_set_effective_context. `caller`:
        the asking instance's HostCalls; a reply reaches it only while it still serves."""
        from .callout import fetch  # aiohttp is only imported by filters that call out

        base = self.resolve_upstream(upstream)
        token = next(self._tokens)
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            self._callout(caller, token, fetch(base, headers, body, timeout_ms))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return token

    async def _callout(
        self,
        caller: object,
        token: int,
        request: Coroutine[Any, Any, CalloutResponse | None],
    ) -> None:
        response = await request
        vm = self.vm
        if vm is None or vm.calls is not caller:
            return  # the instance that asked is gone
        try:
            vm.http_call_response(token, response)
        except WasmCallError as exc:
            self.trapped(vm, exc)
