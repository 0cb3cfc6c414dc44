"""Fused callbacks: a small wasm module, instantiated beside a filter in its store, that
runs the callbacks the host always runs back to back in one call into wasm.

Every call from Python into wasm costs more than the callbacks of a simple filter do
(ctypes, wasmtime's entry, the Python around them: 3-5 us each, more in a busy sidecar),
and a call through an SDK-built filter makes six: context create, request headers,
response headers, done, log, delete. The driver makes it two: `begin` runs
on_context_create then on_request_headers; `finish` runs on_response_headers then, if it
let the stream go on and no body callback follows, on_done, on_log and on_delete; `close`
runs those three when `finish` could not. Calls between the two instances stay in wasm.

What the host does between two callbacks it still does, so the guest sees no difference:

- Each callback gets its own CPU deadline. The host refreshes a store's deadline before a
  callback when the epoch moved since it was last set; the ticker writes the epoch into
  the driver's memory and the driver calls `opus_host.refresh_deadline` in that case.
- The effective context (proxy_set_effective_context) lasts one callback: the driver
  numbers the callbacks of a fused call in its memory (`step`), and the host ignores an
  effective context set during an earlier step.
- The request is shown from on_request_headers on, not while the context is created
  (the host reads `step` before it answers a call about the request).
- `finish` runs the stream's end only if on_response_headers returned 0 (continue), so
  a paused stream ends later, as before. What the host does with a local reply or a closed
  stream after on_response_headers (replacing the response) is nothing the guest sees.
- A trap is reported as the trapping callback's; one in the stream's end, after a good
  on_response_headers, is reported when the stream closes (the response stands).

Memory layout (little-endian): `step` i32 at 0, the current epoch u64 at 8 (the ticker's),
the epoch the store's deadline was set at u64 at 16 (the host's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime

from . import native

STEP, EPOCH, DEADLINE_EPOCH = 0, 8, 16

_CREATE = "proxy_on_context_create"
_REQUEST = "proxy_on_request_headers"
_RESPONSE = "proxy_on_response_headers"
_END = ("proxy_on_done", "proxy_on_log", "proxy_on_delete")
CALLBACKS = (_CREATE, _REQUEST, _RESPONSE, *_END)


def _shapes(abi: str) -> dict[str, tuple[int, int]]:
    """(params, results) of each callback the driver may call."""
    headers = (2 if abi == "0.1.0" else 3, 1)
    return {
        _CREATE: (2, 0),
        _REQUEST: headers,
        _RESPONSE: headers,
        "proxy_on_done": (1, 1),
        "proxy_on_log": (1, 0),
        "proxy_on_delete": (1, 0),
    }


@dataclass(frozen=True)
class Plan:
    """What a filter's driver fuses: the WAT, and for each export the callbacks it runs,
    by step (step k runs names[k - 1])."""

    wat: str
    begin: tuple[str, ...]
    finish: tuple[str, ...]
    close: tuple[str, ...]


def plan(abi: str, exports: dict[str, wasmtime.FuncType]) -> Plan | None:
    """The driver for a module exporting `exports` (callback name -> type), or None when
    fusing would not spare a call into wasm (or a callback has an unexpected shape)."""
    shapes = _shapes(abi)
    present: dict[str, int] = {}  # name -> number of results
    for name, (params, results) in shapes.items():
        ty = exports.get(name)
        if ty is None:
            continue
        if len(ty.params) != params or len(ty.results) != results:
            return None
        if any(str(t) != "i32" for t in (*ty.params, *ty.results)):
            return None
        present[name] = results
    ends = tuple(n for n in _END if n in present)
    begin = (_CREATE, _REQUEST) if _CREATE in present and _REQUEST in present else ()
    finish = (_RESPONSE, *ends) if _RESPONSE in present and ends else ()
    close = ends if len(ends) > 1 else ()
    if not (begin or finish or close):
        return None
    with_eos = shapes[_REQUEST][0] == 3
    lines = [
        "(module",
        '  (import "opus_host" "refresh_deadline" (func $refresh))',
    ]
    for name in present:
        params, results = shapes[name]
        sig = f"(param{' i32' * params})" + (" (result i32)" if results else "")
        lines.append(f'  (import "filter" "{name}" (func ${name} {sig}))')
    lines += [
        '  (memory (export "memory") 1)',
        "  ;; Callback `step` of a fused call starts. The host set the deadline for the first;",
        "  ;; a later one gets a fresh deadline if the epoch moved, as the host gives each.",
        "  (func $enter (param $step i32)",
        f"    (i32.store (i32.const {STEP}) (local.get $step))",
        "    (if (i32.gt_u (local.get $step) (i32.const 1))",
        f"      (then (if (i64.ne (i64.load (i32.const {EPOCH}))",
        f"                        (i64.load (i32.const {DEADLINE_EPOCH})))",
        "        (then (call $refresh))))))",
    ]
    if begin:
        # begin(context, root, num_headers[, end_of_stream]): create, then request headers
        lines += [
            f'  (func (export "begin") (param i32 i32 i32{" i32" if with_eos else ""})',
            "    (result i32)",
            "    (call $enter (i32.const 1))",
            f"    (call ${_CREATE} (local.get 0) (local.get 1))",
            "    (call $enter (i32.const 2))",
            f"    (call ${_REQUEST} (local.get 0) (local.get 2)"
            + (" (local.get 3)))" if with_eos else "))"),
        ]
    if finish:
        # finish(context, num_headers[, end_of_stream]): response headers, then the end
        args = "(local.get 0) (local.get 1)" + (" (local.get 2)" if with_eos else "")
        lines += [
            f'  (func (export "finish") (param i32 i32{" i32" if with_eos else ""})',
            "    (result i32) (local $action i32)",
            "    (call $enter (i32.const 1))",
            f"    (local.set $action (call ${_RESPONSE} {args}))",
            "    (if (local.get $action) (then (return (local.get $action))))",
        ]
        lines += [
            f"    {_enter_and_call(step, name, present)}" for step, name in enumerate(ends, 2)
        ]
        lines.append("    (i32.const 0))")
    if close:
        lines.append('  (func (export "close") (param i32)')
        lines += [
            f"    {_enter_and_call(step, name, present)}" for step, name in enumerate(close, 1)
        ]
        lines[-1] += ")"
    lines.append(")")
    return Plan("\n".join(lines) + "\n", begin, finish, close)


def _enter_and_call(step: int, name: str, present: dict[str, int]) -> str:
    call = f"(call ${name} (local.get 0))"
    return f"(call $enter (i32.const {step})) " + (f"(drop {call})" if present[name] else call)


class Fused:
    """A filter's driver, linked into its store: the fused calls and the driver's memory.

    `begin`, `finish` and `close` are None where the plan has no such call."""

    def __init__(
        self,
        plan: Plan,
        module: wasmtime.Module,
        store: wasmtime.Store,
        callbacks: dict[str, wasmtime.Func],
        refresh_deadline: Callable[[], None],
        raised: native.RaisedBox,
        keep: list[Any],
    ) -> None:
        self.plan = plan
        linker = wasmtime.Linker(store.engine)
        refresh_type = wasmtime.FuncType([], [])
        native.define_host_func(
            linker, "opus_host", "refresh_deadline", refresh_type, refresh_deadline, raised, keep
        )
        for name in {*plan.begin, *plan.finish, *plan.close}:
            linker.define(store, "filter", name, callbacks[name])
        exports = linker.instantiate(store, module).exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        raw = native.RawMemory(store, memory)
        cells = raw.view[raw.base : raw.base + 24]
        self.words = cells.cast("i")  # [STEP // 4]
        self.epochs = cells.cast("Q")  # [EPOCH // 8], [DEADLINE_EPOCH // 8]
        self._keep = (store, raw)

        def export(name: str, names: tuple[str, ...]) -> native.ExportFn | None:
            if not names:
                return None
            func = exports[name]
            assert isinstance(func, wasmtime.Func)
            ty = func.type(store)
            params = len(ty.params)
            return native.export_caller(store, func, name, params, params, raised)

        self.begin = export("begin", plan.begin)
        self.finish = export("finish", plan.finish)
        self.close = export("close", plan.close)

    @property
    def step(self) -> int:
        """Which callback of the current (or last) fused call runs (ran): 1, 2, ..."""
        return self.words[STEP // 4]

    def callback_name(self, names: tuple[str, ...]) -> str:
        step = self.words[STEP // 4]
        return names[step - 1] if 0 < step <= len(names) else "?"
