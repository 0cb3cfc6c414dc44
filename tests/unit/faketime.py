"""Clocks for the unit tier that move only when a test moves them.

`FakeTimers` is a `sidecar.clock.Timers` for the adapters: `advance(seconds)` runs every
timer that falls due, in order, each seeing `time()` at its own deadline.

`VirtualTimeLoop` is an asyncio loop whose clock jumps to the next timer whenever it
has nothing else to do, so code that sleeps (a discovery backend's poll loop, an
emulator's expiry) runs its seconds in no time. Its I/O is real (in-process servers on
127.0.0.1), so before each jump it gives the sockets a moment (`IO_GRACE`) to answer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Real seconds a VirtualTimeLoop waits for I/O before it jumps its clock.
IO_GRACE = 0.0005


class FakeTimer:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._due: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        heapq.heappush(self._due, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    @property
    def pending(self) -> int:
        return sum(1 for _, _, timer in self._due if not timer.cancelled)

    def advance(self, seconds: float) -> None:
        """Move the clock on by `seconds`, running the timers due on the way (and those
        they set, if they fall due too)."""
        end = self.now + seconds
        for _ in range(100_000):
            if not self._due or self._due[0][0] > end:
                break
            when, _, timer = heapq.heappop(self._due)
            if timer.cancelled:
                continue
            self.now = max(self.now, when)
            timer.callback(*timer.args)
        else:
            raise AssertionError("timers keep re-arming for no time: a busy loop")
        self.now = end


class _JumpingSelector(selectors.DefaultSelector):
    """Where the loop would block until its next timer, wait `IO_GRACE` for I/O and, if
    none came, move the loop's clock to that timer instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        ready = super().select(IO_GRACE if timeout is None else min(timeout, IO_GRACE))
        if not ready and timeout is not None and self.loop is not None:
            self.loop.offset += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run()` on a VirtualTimeLoop. (No wait_for: its deadline would jump too;
    pytest's per-test timeout guards a test that never ends.)"""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
