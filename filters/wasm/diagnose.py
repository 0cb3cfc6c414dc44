"""Why a filter failed to start, when the cause is what it was given: root_id or configuration.

A proxy-wasm SDK meets a missing setting with a trap whose backtrace names neither: the
AssemblyScript SDK logs "Missing root context factory for root id: X" and then calls
proc_exit when no root context is registered under root_id, and its default onConfigure
reads out of bounds when the configuration is empty. `misconfigured()` recognises these
from the start failure and the guest's logs and names the setting to pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from .native import WasmCallError

NO_ROOT_CONTEXT = "root context factory for root id"  # the AssemblyScript SDK's log line
MEMORY_FAULTS = ("memory fault", "out of bounds memory access")
REJECTED = "the root context rejected its configuration"  # Plugin.acquire's error
CLI_FLAGS = {"root_id": "--root-id NAME", "configuration": "--plugin-config STRING|@FILE"}


class Misconfigured(WasmCallError):
    """The filter failed to start for want of a setting: `key` names it (root_id or
    configuration, as in Envoy's plugin config); the message says what was wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{problem}: set {key} (Envoy's {key})")
        self.key = key
        self.problem = problem

    def for_cli(self) -> str:
        return f"{self.problem}: pass {CLI_FLAGS[self.key]} (Envoy's {self.key})"


def misconfigured(
    error: BaseException, guest_logs: Sequence[str], root_id: str, configuration: bytes
) -> Misconfigured | None:
    """The setting to blame for a start failure (`error`), or None when it is not one."""
    if any(NO_ROOT_CONTEXT in line.lower() for line in guest_logs):
        return Misconfigured(
            "root_id",
            f"the filter has no root context registered under root_id {root_id!r} "
            "(the name given to the SDK's registerRootContext(..., NAME))",
        )
    if configuration:
        return None
    message = str(error)
    if message.startswith("proxy_on_configure:") and any(f in message for f in MEMORY_FAULTS):
        return Misconfigured(
            "configuration",
            "the filter's proxy_on_configure faulted on an empty configuration "
            "(AssemblyScript SDK 0.1.8's default onConfigure traps on one)",
        )
    if message == REJECTED:
        return Misconfigured("configuration", "the filter rejected an empty configuration")
    return None
