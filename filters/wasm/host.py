"""What the host functions need of the configured filter they serve: the `Host` protocol.

The host functions (hostcalls.py, servicecalls.py, properties.py) act on one instance's
memory and contexts and reach past it only through this protocol, which `Plugin`
(plugin.py) implements; so the ABI code depends on this leaf, never on the VM or the
plugin that own it. `Owner` adds what the VM (vm.py) needs to build an instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import wasmtime

    from .metrics import PluginMetrics
    from .runtime import SharedData, WasmRuntime


class Host(Protocol):
    name: str
    root_id: str
    vm_id: str
    service_name: str
    direction: str
    configuration: bytes
    vm_configuration: bytes
    properties: dict[str, bytes]  # set by the guest on its root context
    metrics: PluginMetrics

    @property
    def shared(self) -> SharedData:
        """Shared data and queues, across instances and plugins (the runtime's)."""
        ...

    def guest_log(self, level: int, message: str) -> None: ...

    def set_tick_period(self, period_ms: int) -> None: ...

    def queue_ready(self, queue_id: int) -> None: ...

    def resolve_upstream(self, upstream: str) -> str | None: ...

    def can_call_out(self) -> bool: ...

    def http_call(
        self,
        caller: object,
        upstream: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout_ms: int,
    ) -> int:
        """Start a callout for the instance `caller`; returns its token."""
        ...


class Owner(Host, Protocol):
    """The plugin that owns an instance: the Host, its engine, settings and limits."""

    engine: wasmtime.Engine
    runtime: WasmRuntime
    native: bool
    min_log_level: int
    max_memory_bytes: int
    deadline_ticks: int

    def note_unimplemented(self, name: str) -> None: ...
