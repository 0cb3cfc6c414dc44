"""Per-call figures are counted in plain structures and folded into prometheus_client's
children when metrics are read: the exposition must be what direct prometheus calls
on every call would have given, byte for byte, in single-process and multiprocess mode."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics import exposition as openmetrics

from sidecar.admin import AdminServer
from sidecar.metrics import DURATION_BUCKETS, SIZE_BUCKETS, Metrics
from sidecar.upstream.pool import PoolMetrics

# Every bound exactly, 0, past the last bound, and sums whose float value depends on
# the order they are added in (0.1 + 0.2 + 0.3).
DURATIONS = [0.0, *DURATION_BUCKETS, 10.000001, 1e9, 0.1, 0.2, 0.3, 0.00042, 1 / 3, 7e-05]
SIZES = [0, *SIZE_BUCKETS, 1, 99, 101, 100_000_001, 2**40, 300]
KEYS = [
    ("outbound", "inventory", 200, "", ""),
    ("outbound", "inventory", 404, "", ""),
    ("outbound", "reviews", 200, "pkg.Reviews/Get", "0"),
    ("outbound", "reviews", 200, "pkg.Reviews/Get", "14"),
    ("inbound", "payment", 503, "", ""),
]
POOLS = [("inventory", "h2c"), ("reviews", "http1")]

Step = tuple[
    str, Any
]  # ("call", (key, seconds, bytes_in, bytes_out)), ("stream", pool), ("fold", None)


def steps() -> list[Step]:
    out: list[Step] = []
    sizes = itertools.cycle(SIZES)
    keys = itertools.cycle(KEYS)
    pools = itertools.cycle(POOLS)
    for i, seconds in enumerate(DURATIONS * 3):
        out.append(("call", (next(keys), seconds, next(sizes), next(sizes))))
        out.append(("stream", next(pools)))
        if i % 7 == 0:
            out.append(("fold", None))  # a scrape (or the worker's timer) mid-way
    return out


def direct(metrics: Metrics) -> tuple[Callable[..., None], Callable[[tuple[str, str]], None]]:
    """What observe_request() and PoolMetrics.stream() did before: prometheus calls per call."""

    def observe(key: tuple[str, str, int, str, str], seconds: float, bin: int, bout: int) -> None:
        direction, service, status, method, grpc_status = key
        metrics.requests.labels(direction, service, method, str(status), grpc_status).inc()
        metrics.request_duration.labels(direction, service).observe(seconds)
        metrics.request_size.labels(direction, service).observe(bin)
        metrics.response_size.labels(direction, service).observe(bout)

    def stream(pool: tuple[str, str]) -> None:
        metrics.upstream_streams.labels(*pool).inc()

    return observe, stream


def folded(metrics: Metrics) -> tuple[Callable[..., None], Callable[[tuple[str, str]], None]]:
    pools = {pool: PoolMetrics(metrics, *pool) for pool in POOLS}

    def observe(key: tuple[str, str, int, str, str], seconds: float, bin: int, bout: int) -> None:
        direction, service, status, method, grpc_status = key
        metrics.observe_request(direction, service, status, seconds, method, grpc_status, bin, bout)

    def stream(pool: tuple[str, str]) -> None:
        pools[pool].stream()

    return observe, stream


def play(metrics: Metrics, path: str) -> None:
    observe, stream = direct(metrics) if path == "direct" else folded(metrics)
    if path == "direct":
        for pool in POOLS:  # the pools' series, made when a pool is built
            PoolMetrics(metrics, *pool)
    for kind, arg in steps():
        if kind == "call":
            observe(*arg)
        elif kind == "stream":
            stream(arg)
        elif path == "folded":
            metrics.fold()


def opus_lines(text: bytes) -> list[str]:
    # _created holds each series' creation time, which differs between two runs.
    return [
        line for line in text.decode().splitlines() if "opus_" in line and "_created" not in line
    ]


@pytest.mark.parametrize(
    "writer",
    [generate_latest, openmetrics.generate_latest],
    ids=["prometheus-text", "openmetrics"],
)
def test_exposition_equals_direct_prometheus_calls(writer: Callable[[Any], bytes]) -> None:
    old, new = Metrics(), Metrics()
    play(old, "direct")
    play(new, "folded")
    new.observe_request("inbound", "payment", 200, 0.5, bytes_in=7)  # left pending
    old.requests.labels("inbound", "payment", "", "200", "").inc()
    old.request_duration.labels("inbound", "payment").observe(0.5)
    old.request_size.labels("inbound", "payment").observe(7)
    old.response_size.labels("inbound", "payment").observe(0)
    expected = opus_lines(writer(old.registry))
    assert len(expected) > 100  # every family, bucket and series made it
    assert opus_lines(writer(new.registry)) == expected
    # A second read folds nothing new and changes nothing.
    assert opus_lines(writer(new.registry)) == expected


@pytest.fixture
def multiprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], Path]]:
    """Switch prometheus_client to multiprocess values (as a worker under `workers: N`
    has them) writing in a fresh directory; the returned function starts another one."""

    def use(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: 123))
        return directory

    yield use
    values.close_all_multiprocess_files()


def supervisor_view(directory: Path) -> CollectorRegistry:
    """What the supervisor reads: the workers' files, not their registries."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def test_multiprocess_sum_equals_direct_prometheus_calls(
    multiprocess: Callable[[str], Path],
) -> None:
    direct_dir = multiprocess("direct")
    play(Metrics(), "direct")
    folded_dir = multiprocess("folded")
    worker = Metrics()
    play(worker, "folded")
    worker.close()  # a worker's fold at shutdown
    expected = opus_lines(generate_latest(supervisor_view(direct_dir)))
    assert len(expected) > 100
    assert opus_lines(generate_latest(supervisor_view(folded_dir))) == expected


def test_reading_the_registry_folds_what_is_pending() -> None:
    metrics = Metrics()
    pool = PoolMetrics(metrics, "inventory", "h2c")
    metrics.observe_request("outbound", "inventory", 200, 0.003, bytes_in=300, bytes_out=20)
    pool.stream()
    pool.stream()
    assert metrics.pending_streams
    sample = metrics.registry.get_sample_value
    labels = {"direction": "outbound", "service": "inventory"}
    assert sample("opus_upstream_streams_total", {"service": "inventory", "protocol": "h2c"}) == 2
    assert not metrics.pending_streams
    code = {**labels, "method": "", "code": "200", "grpc_status": ""}
    assert sample("opus_requests_total", code) == 1
    assert sample("opus_request_duration_seconds_bucket", {**labels, "le": "0.0025"}) == 0
    assert sample("opus_request_duration_seconds_bucket", {**labels, "le": "0.005"}) == 1
    assert sample("opus_request_size_bytes_sum", labels) == 300
    metrics.observe_request("outbound", "inventory", 200, 0.003)
    assert sample("opus_requests_total", code) == 2
    assert sample("opus_request_duration_seconds_count", labels) == 2
    assert sample("opus_request_duration_seconds_sum", labels) == 0.003 + 0.003


class AdminState:
    def __init__(self, metrics: Metrics) -> None:
        self.ready = True
        self.draining = False
        self.metrics_registry = metrics.registry


def test_admin_scrape_and_stats_fold_what_is_pending() -> None:
    async def go() -> None:
        metrics = Metrics()
        server = AdminServer(AdminState(metrics), "127.0.0.1", 0)  # type: ignore[arg-type]
        port = await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                metrics.observe_request("inbound", "payment", 503, 0.2)
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                assert (
                    'opus_requests_total{code="503",direction="inbound",grpc_status="",'
                    'method="",service="payment"} 1.0'
                ) in text
                assert (
                    'opus_request_duration_seconds_bucket{direction="inbound",le="0.25",'
                    'service="payment"} 1.0'
                ) in text
                metrics.observe_request("inbound", "payment", 503, 0.2)
                url = f"http://127.0.0.1:{port}/stats?filter=opus_requests_total"
                async with session.get(url) as resp:
                    stats = await resp.json()
                assert [s["value"] for s in stats["opus_requests_total"]] == [2.0]
        finally:
            await server.close()

    asyncio.run(go())


class FakeTimers:
    """Stands in for loop.call_later: records the timers; the test fires them."""

    def __init__(self) -> None:
        self.armed: list[FakeTimers.Handle] = []

    class Handle:
        def __init__(self, delay: float, callback: Callable[[], None]) -> None:
            self.delay = delay
            self.callback = callback
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimers.Handle:
        handle = FakeTimers.Handle(delay, callback)
        self.armed.append(handle)
        return handle

    def fire(self) -> None:
        (handle,) = [h for h in self.armed if not h.cancelled]
        self.armed.remove(handle)
        handle.callback()


def test_worker_folds_on_a_timer_while_figures_are_pending(
    multiprocess: Callable[[str], Path],
) -> None:
    directory = multiprocess("worker")
    timers = FakeTimers()
    metrics = Metrics()
    pool = PoolMetrics(metrics, "inventory", "h2c")
    metrics.fold_every(0.5, timers.call_later)
    assert timers.armed == []  # nothing pending: no timer
    labels = {"direction": "outbound", "service": "inventory"}
    code = {**labels, "method": "", "code": "200", "grpc_status": ""}
    streams = {"service": "inventory", "protocol": "h2c"}

    def seen(name: str, labels: dict[str, str]) -> float | None:
        return supervisor_view(directory).get_sample_value(name, labels)

    metrics.observe_request("outbound", "inventory", 200, 0.1, bytes_in=5)
    metrics.observe_request("outbound", "inventory", 200, 0.2)
    pool.stream()
    assert [h.delay for h in timers.armed] == [0.5]  # one timer, however many calls
    assert seen("opus_requests_total", code) == 0  # not folded yet
    timers.fire()
    assert seen("opus_requests_total", code) == 2
    assert seen("opus_request_duration_seconds_sum", labels) == 0.1 + 0.2
    assert seen("opus_request_size_bytes_sum", labels) == 5
    assert seen("opus_upstream_streams_total", streams) == 1
    assert timers.armed == []  # idle again: the timer is not re-armed

    pool.stream()  # a stream alone is pending too
    assert len(timers.armed) == 1
    timers.fire()
    assert seen("opus_upstream_streams_total", streams) == 2

    metrics.observe_request("outbound", "inventory", 200, 0.3)
    (handle,) = timers.armed
    metrics.close()  # shutdown: the timer goes, the figures are folded
    assert handle.cancelled
    assert seen("opus_requests_total", code) == 3
    assert seen("opus_request_duration_seconds_sum", labels) == 0.1 + 0.2 + 0.3
    metrics.observe_request("outbound", "inventory", 200, 0.3)
    assert timers.armed == [handle]  # closed: no new timer


def test_a_reused_pid_file_keeps_its_sum(multiprocess: Callable[[str], Path]) -> None:
    """A dead worker's file stays (its counts are history); a new worker given the same
    pid continues from it, as prometheus_client's own values do."""
    directory = multiprocess("worker")
    first = Metrics()
    first.observe_request("outbound", "inventory", 200, 0.25)
    first.close()
    second = Metrics()
    second.observe_request("outbound", "inventory", 200, 0.5)
    second.close()
    labels = {"direction": "outbound", "service": "inventory"}
    registry = supervisor_view(directory)
    assert registry.get_sample_value("opus_request_duration_seconds_sum", labels) == 0.75
    assert registry.get_sample_value("opus_request_duration_seconds_count", labels) == 2
