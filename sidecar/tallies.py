"""The per-call side of the metrics (sidecar/metrics.py): plain counts per label key and
per histogram bucket, kept off prometheus_client's locked values, and folded into the
prometheus children when the registry is read (or on a timer under `workers: N`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol, TypeVar

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
Tallies = tuple[list[float], list[float], list[float]]  # duration, request size, response size


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# loop.call_later's shape, injected so the fold timer is testable without sleeping.
CallLater = Callable[[float, Callable[[], None]], Cancellable]


class PendingCounts(dict[_K, _V]):
    """What was counted per label key since the last fold. A key's first use after a fold
    goes through `__missing__`, which makes its entry with `new(key)` (and so can tell
    the fold timer that figures are pending): the hot path pays nothing for either."""

    __slots__ = ("_new",)

    def __init__(self, new: Callable[[_K], _V]) -> None:
        super().__init__()
        self._new = new

    def __missing__(self, key: _K) -> _V:
        value = self[key] = self._new(key)
        return value


class Count:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class Calls(Count):
    """Calls under one request-counter key, and their (direction, service)'s tallies."""

    __slots__ = ("tallies",)

    def __init__(self, tallies: Tallies) -> None:
        super().__init__()
        self.tallies = tallies


class FoldOnCollect:
    """Registered ahead of the metrics, so every read of the registry folds first."""

    def __init__(self, fold: Callable[[], None]) -> None:
        self._fold = fold

    def describe(self) -> list[Metric]:
        return []  # no series of its own

    def collect(self) -> list[Metric]:
        self._fold()
        return []


def new_tally(child: Histogram) -> list[float]:
    # The sum starts from the child's own: a multiprocess file left by a dead worker
    # whose pid this process reuses already holds one.
    return [0] * len(child._upper_bounds) + [child._sum.get()]


def fold_histogram(tally: list[float], child: Histogram) -> None:
    # The child keeps per-bucket (not cumulative) values and cumulates when collected,
    # so adding each bucket's count gives what observe() would have left.
    for i, value in enumerate(child._buckets):
        count = tally[i]
        if count:
            value.inc(count)
            tally[i] = 0
    # The sum is carried whole, not as a delta since the last fold: added up call by
    # call in observe()'s order, it is the same float observe() would have made.
    child._sum.set(tally[-1])
