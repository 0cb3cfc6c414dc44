"""The metrics filters declare for themselves (`FilterContext.metrics`), in the sidecar's
registry, instead of reaching into the sidecar's own `Metrics`.

A metric is named `opus_<name>` and made at its first declaration; a later declaration of
the same name (the same filter in another chain, or another filter sharing it, as `retry`
and `timeout` share `opus_timeouts`) gets the same object back, and one of another type or
other labels is an error that stops the sidecar when its chains are built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

PREFIX = "opus_"

# How a gauge's values from `workers: N` processes combine (prometheus_client's modes).
GaugeMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent",
    "livemostrecent",
]  # fmt: skip

_M = TypeVar("_M", bound=MetricWrapperBase)
_C = TypeVar("_C", bound=Collector)


class FilterMetrics:
    """Declares filters' metrics in one registry (the sidecar's, or a test's)."""

    __slots__ = ("_collectors", "_declared", "_registry")

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._declared: dict[str, tuple[tuple[str, ...], MetricWrapperBase]] = {}
        self._collectors: dict[type[Collector], Collector] = {}

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """The counter `opus_<name>` (exposed as `opus_<name>_total`)."""

        def make(full: str, labelnames: tuple[str, ...]) -> Counter:
            return Counter(full, documentation, labelnames, registry=self._registry)

        return self._declare(Counter, name, labels, make)

    def gauge(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        multiprocess_mode: GaugeMode = "all",
    ) -> Gauge:
        """The gauge `opus_<name>`; `multiprocess_mode` says how workers' values combine."""

        def make(full: str, labelnames: tuple[str, ...]) -> Gauge:
            return Gauge(
                full,
                documentation,
                labelnames,
                registry=self._registry,
                multiprocess_mode=multiprocess_mode,
            )

        return self._declare(Gauge, name, labels, make)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> Histogram:
        """The histogram `opus_<name>` with these bucket bounds."""

        def make(full: str, labelnames: tuple[str, ...]) -> Histogram:
            return Histogram(
                full, documentation, labelnames, registry=self._registry, buckets=buckets
            )

        return self._declare(Histogram, name, labels, make)

    def collector(self, kind: type[_C]) -> _C:
        """The one `kind()` registered in this registry, for a filter that computes its
        series when they are read (as `wasm` does for its guests' own metrics)."""
        found = self._collectors.get(kind)
        if found is None:
            found = self._collectors[kind] = kind()
            self._registry.register(found)
        assert isinstance(found, kind)
        return found

    def _declare(
        self,
        kind: type[_M],
        name: str,
        labels: Sequence[str],
        make: Callable[[str, tuple[str, ...]], _M],
    ) -> _M:
        if name.startswith(PREFIX):
            raise ValueError(f"metric {name!r}: declare it without the {PREFIX!r} prefix")
        full = PREFIX + name
        labelnames = tuple(labels)
        found = self._declared.get(full)
        if found is None:
            metric = make(full, labelnames)
            self._declared[full] = (labelnames, metric)
            return metric
        declared_labels, existing = found
        if not isinstance(existing, kind) or declared_labels != labelnames:
            raise ValueError(
                f"metric {full!r} is already declared as a {type(existing).__name__.lower()} "
                f"with labels {list(declared_labels)}"
            )
        return existing
