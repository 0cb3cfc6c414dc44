"""Guest-defined metrics (proxy_define_metric and friends) and the wasm host's own counters,
exported on the sidecar's /metrics through one collector per registry.

Names are the guest's, made Prometheus-safe; every series carries the filter's name. The
same filter built into several chains (inbound, outbound, per route) shares one series.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from .abi import MetricType

if TYPE_CHECKING:
    from sidecar.sdk import FilterMetrics

_UNSAFE = re.compile(r"[^a-zA-Z0-9_:]")


def prometheus_name(name: str) -> str:
    safe = _UNSAFE.sub("_", name)
    return safe if safe and not safe[0].isdigit() else f"_{safe}"


@dataclass(slots=True)
class GuestMetric:
    kind: int
    name: str
    value: int = 0  # counter and gauge value; histogram sum
    count: int = 0  # histogram observations


class PluginMetrics:
    """The metrics of one filter (kept across instance rebuilds: ids stay valid)."""

    def __init__(self, filter_name: str) -> None:
        self.filter_name = filter_name
        self.by_id: dict[int, GuestMetric] = {}
        self._ids: dict[tuple[int, str], int] = {}
        self.traps = 0
        self.instances = 0
        self.unimplemented_calls = 0

    def define(self, kind: int, name: str) -> int:
        metric_id = self._ids.get((kind, name))
        if metric_id is None:
            # ids encode the type in the low bits, as cpp-host does, so they never collide
            metric_id = (len(self._ids) + 1) << 2 | kind
            self._ids[(kind, name)] = metric_id
            self.by_id[metric_id] = GuestMetric(kind, name)
        return metric_id

    def increment(self, metric_id: int, delta: int) -> bool:
        metric = self.by_id.get(metric_id)
        if metric is None or metric.kind == MetricType.HISTOGRAM:
            return False
        metric.value += delta
        return True

    def record(self, metric_id: int, value: int) -> bool:
        metric = self.by_id.get(metric_id)
        if metric is None:
            return False
        if metric.kind == MetricType.HISTOGRAM:
            metric.value += value
            metric.count += 1
        else:
            metric.value = value
        return True

    def get(self, metric_id: int) -> int | None:
        metric = self.by_id.get(metric_id)
        return None if metric is None else metric.value


class WasmCollector(Collector):
    def __init__(self) -> None:
        self.plugins: weakref.WeakSet[PluginMetrics] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        plugins = list(self.plugins)
        traps = CounterMetricFamily(
            "opus_wasm_traps", "Wasm filter callbacks that trapped, by filter.", labels=["filter"]
        )
        instances = CounterMetricFamily(
            "opus_wasm_instances",
            "Wasm filter instances started (a trap replaces one), by filter.",
            labels=["filter"],
        )
        totals: dict[str, list[int]] = {}
        for p in plugins:
            t = totals.setdefault(p.filter_name, [0, 0])
            t[0] += p.traps
            t[1] += p.instances
        for name, (trapped, started) in sorted(totals.items()):
            traps.add_metric([name], trapped)
            instances.add_metric([name], started)
        yield traps
        yield instances
        merged: dict[tuple[str, int], dict[str, list[int]]] = {}
        for p in plugins:
            for m in p.by_id.values():
                series = merged.setdefault((prometheus_name(m.name), m.kind), {})
                acc = series.setdefault(p.filter_name, [0, 0])
                acc[0] += m.value
                acc[1] += m.count
        for (name, kind), series in sorted(merged.items()):
            doc = f"Defined by a wasm filter ({MetricType(kind).name.lower()})."
            family: CounterMetricFamily | GaugeMetricFamily | SummaryMetricFamily
            if kind == MetricType.COUNTER:
                family = CounterMetricFamily(name, doc, labels=["filter"])
                for flt, (value, _) in sorted(series.items()):
                    family.add_metric([flt], value)
            elif kind == MetricType.GAUGE:
                family = GaugeMetricFamily(name, doc, labels=["filter"])
                for flt, (value, _) in sorted(series.items()):
                    family.add_metric([flt], value)
            else:
                family = SummaryMetricFamily(name, doc, labels=["filter"])
                for flt, (total, count) in sorted(series.items()):
                    family.add_metric([flt], count_value=count, sum_value=total)
            yield family


def export_to(metrics: FilterMetrics, plugin: PluginMetrics) -> None:
    """Show `plugin`'s metrics on the sidecar's exposition (one collector per registry)."""
    metrics.collector(WasmCollector).plugins.add(plugin)
