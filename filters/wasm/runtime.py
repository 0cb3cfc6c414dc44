"""What every wasm filter of the process shares: the Engine, the epoch ticker that enforces
CPU deadlines, the module cache, and proxy-wasm shared data and queues.

wasmtime wants one Engine per process (compiled code and the epoch counter live there), and
proxy-wasm shared data is visible to every instance with the same vm_id, so this is the one
process-wide object of the package: `shared_runtime()` makes it on first use. Tests and the
CLI may build their own WasmRuntime and pass it in instead.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path

import wasmtime

from . import native
from .cache import ModuleCache, default_cache_dir

EPOCH_TICK_MS = 5

_LOG_GATE = """(module
  (import "opus_host" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (func (export "proxy_log") (param i32 i32 i32) (result i32)
    (if (result i32) (i32.lt_u (local.get 0) (i32.const %d))
      (then (i32.const 0))
      (else (call $log (local.get 0) (local.get 1) (local.get 2))))))"""


class SharedData:
    """proxy_{get,set}_shared_data with compare-and-swap, and the shared queues."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, bytes], tuple[bytes, int]] = {}
        self._queues: dict[int, deque[bytes]] = {}
        self._queue_ids: dict[tuple[str, bytes], int] = {}
        self._queue_owner: dict[int, Callable[[int], None]] = {}
        self._ids = itertools.count(1)

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        return self._data.get((vm_id, key))

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> bool:
        old = self._data.get((vm_id, key))
        if cas and old is not None and old[1] != cas:
            return False
        self._data[(vm_id, key)] = (value, (old[1] + 1) if old else 1)
        return True

    def register_queue(self, vm_id: str, name: bytes, ready: Callable[[int], None]) -> int:
        queue_id = self._queue_ids.get((vm_id, name))
        if queue_id is None:
            queue_id = self._queue_ids[(vm_id, name)] = next(self._ids)
            self._queues[queue_id] = deque()
        self._queue_owner[queue_id] = ready
        return queue_id

    def resolve_queue(self, vm_id: str, name: bytes) -> int | None:
        return self._queue_ids.get((vm_id, name))

    def enqueue(self, queue_id: int, value: bytes) -> bool:
        queue = self._queues.get(queue_id)
        if queue is None:
            return False
        queue.append(value)
        owner = self._queue_owner.get(queue_id)
        if owner is not None:
            owner(queue_id)
        return True

    def dequeue(self, queue_id: int) -> bytes | None:
        queue = self._queues[queue_id]  # KeyError: no such queue
        return queue.popleft() if queue else None


class WasmRuntime:
    def __init__(self, cache_dir: Path | None = None, tick_ms: int = EPOCH_TICK_MS) -> None:
        config = wasmtime.Config()
        # Epoch interruption bounds a callback's wall time (the ticker below advances the
        # epoch); it is cheaper per instruction than fuel and measures time, not work.
        config.epoch_interruption = True
        # A memory that never moves keeps its base address valid for the native boundary's
        # raw view (native.RawMemory); growth happens inside the up-front reservation.
        config.memory_may_move = False
        self.engine = wasmtime.Engine(config)
        self._increment_epoch = native.epoch_incrementer(self.engine)
        self.tick_ms = tick_ms
        self.epoch = 0  # mirrors the engine's epoch (advanced first, so never behind it)
        self.cache = ModuleCache(self.engine, "epoch_interruption;memory_may_move=0", cache_dir)
        self.shared = SharedData()
        self._log_gates: dict[int, wasmtime.Module] = {}
        self._drivers: dict[str, wasmtime.Module] = {}
        # Epoch cells (fused.py): u64 views whose [1] the ticker keeps equal to the epoch,
        # each with (a weak reference to) what keeps the memory under it alive.
        self._epoch_cells: dict[int, tuple[memoryview, weakref.ref[object]]] = {}
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def log_gate(self, min_level: int) -> wasmtime.Module:
        """A one-function module: proxy_log that calls the host only at `min_level` or above."""
        gate = self._log_gates.get(min_level)
        if gate is None:
            gate = self._log_gates[min_level] = wasmtime.Module(self.engine, _LOG_GATE % min_level)
        return gate

    def driver(self, wat: str) -> wasmtime.Module:
        """The compiled fused-call driver for this text (see fused.py)."""
        module = self._drivers.get(wat)
        if module is None:
            module = self._drivers[wat] = wasmtime.Module(self.engine, wat)
        return module

    def watch_epoch(self, key: int, cells: memoryview, owner: object) -> None:
        """Keep cells[1] equal to the epoch from now on, until unwatch_epoch(key) or until
        `owner`, which keeps the memory under `cells` alive, is gone."""
        cells[1] = self.epoch
        gone = functools.partial(self._unwatch_if, key)
        self._epoch_cells[key] = (cells, weakref.ref(owner, gone))

    def _unwatch_if(self, key: int, owner: weakref.ref[object]) -> None:
        entry = self._epoch_cells.get(key)
        if entry is not None and entry[1] is owner:
            del self._epoch_cells[key]

    def unwatch_epoch(self, key: int) -> None:
        self._epoch_cells.pop(key, None)

    def deadline_ticks(self, max_cpu_ms: int) -> int:
        # +1: the first tick may come at once, so the budget is never cut short.
        return -(-max_cpu_ms // self.tick_ms) + 1

    def ensure_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        # ctypes releases the GIL while wasm runs, so this thread advances the epoch even
        # while a runaway callback holds the event loop.
        interval = self.tick_ms / 1000
        while not self._stop.wait(interval):
            self.tick()

    def tick(self) -> None:
        """Advance the epoch by one (the ticker's step)."""
        self.epoch += 1
        # Before the engine's: a driver that still reads the old epoch has a deadline
        # that still holds its whole budget.
        for cells, owner in tuple(self._epoch_cells.values()):
            alive = owner()  # held while writing: the memory cannot go meanwhile
            if alive is not None:
                cells[1] = self.epoch
            del alive
        self._increment_epoch()

    def close(self) -> None:
        self._stop.set()


@functools.cache
def shared_runtime(cache_dir: Path | None = None) -> WasmRuntime:
    return WasmRuntime(cache_dir if cache_dir is not None else default_cache_dir())
