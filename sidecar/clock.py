"""The clock and timers the protocol adapters keep their deadlines with.

An adapter takes a `Timers` and, when given none, uses its event loop, which has these
three methods already (loop time, `call_at`, `call_later`), so production pays nothing
for the seam. Tests hand in a clock they move by hand (`tests/unit/faketime.py`) and
see a 10 s keepalive or a 60 s idle timeout fire without waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    def time(self) -> float:
        """Now, in seconds, monotonic (the loop's clock)."""
        ...

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer: ...

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer: ...
