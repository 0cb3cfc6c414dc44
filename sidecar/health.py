"""Endpoint health: passive outlier detection and active health checks.

Both cores are Sans-IO with an injected clock: `OutlierDetector` hears the outcome of
every call (a status code or the error it failed with) and ejects endpoints that fail
in a row; `HealthChecks` turns probe results into healthy/unhealthy with thresholds.
`ActiveChecker` is the one thin driver that touches the network (an HTTP/1.1 GET per
endpoint per interval). The cluster reads both to build its set of candidates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from sidecar.config import AppConfig, HealthCheckConfig, OutlierConfig
from sidecar.discovery.base import Endpoint
from sidecar.errors import BadRequest, PoolExhausted, StreamRefused, UpstreamConnectError
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.health")

# What a call ended with: the response's status, or the error it failed with.
Outcome = int | BaseException

# Errors that say nothing about the endpoint: our own pool was full, the peer is
# draining and refused the stream politely (it is leaving discovery anyway), or the
# caller's request could not be written (BadRequest: never sent).
_NOT_THE_ENDPOINTS_FAULT = (PoolExhausted, StreamRefused, BadRequest)


@dataclass(slots=True)
class _Stats:
    consecutive_5xx: int = 0
    consecutive_connect: int = 0
    times_ejected: int = 0
    returned_at: float = -math.inf


class OutlierDetector:
    """Envoy-style consecutive-failure ejection.

    An endpoint is ejected after `consecutive_5xx` 5xx replies or call failures in a
    row, or `consecutive_connect_failures` connect failures in a row, for
    `base_ejection_time` x the times it has been ejected (capped by
    `max_ejection_time`); the multiplier decays by one for every base_ejection_time it
    then stays in. Never more than `max_ejection_percent` of the set is out at once,
    so a single endpoint is never ejected below 100%.
    """

    def __init__(
        self,
        config: OutlierConfig,
        *,
        now: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        on_eject: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self._config = config
        self._now = now
        self._on_change = on_change
        self._on_eject = on_eject
        self._stats: dict[Endpoint, _Stats] = {}
        self._ejected_until: dict[Endpoint, float] = {}
        self._total = 0
        # The earliest return time; the cluster compares its clock to it on every pick.
        self.next_return = math.inf

    @property
    def ejected(self) -> frozenset[Endpoint]:
        return frozenset(self._ejected_until)

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """The endpoint set changed: forget endpoints that left it."""
        current = set(endpoints)
        self._total = len(current)
        for gone in self._stats.keys() - current:
            del self._stats[gone]
        changed = False
        for gone in self._ejected_until.keys() - current:
            del self._ejected_until[gone]
            changed = True
        if changed:
            self._reschedule()

    def record(self, endpoint: Endpoint, outcome: Outcome) -> bool:
        """Count one call's outcome; True when it ejected the endpoint."""
        if not self._config.enabled:
            return False
        stats = self._stats.get(endpoint)
        if stats is None:
            stats = self._stats[endpoint] = _Stats()
        if isinstance(outcome, int):
            if outcome < 500:
                stats.consecutive_5xx = 0
                stats.consecutive_connect = 0
                return False
            stats.consecutive_5xx += 1
            stats.consecutive_connect = 0
        elif isinstance(outcome, _NOT_THE_ENDPOINTS_FAULT):
            return False
        elif isinstance(outcome, UpstreamConnectError | ConnectionError | OSError):
            stats.consecutive_5xx += 1
            stats.consecutive_connect += 1
        else:  # reset, timeout: a gateway failure, counted like a 5xx
            stats.consecutive_5xx += 1
            stats.consecutive_connect = 0
        if (
            stats.consecutive_5xx < self._config.consecutive_5xx
            and stats.consecutive_connect < self._config.consecutive_connect_failures
        ):
            return False
        return self._eject(endpoint, stats)

    def _eject(self, endpoint: Endpoint, stats: _Stats) -> bool:
        if endpoint in self._ejected_until:
            return False
        total = max(self._total, len(self._stats))
        if (len(self._ejected_until) + 1) * 100 > total * self._config.max_ejection_percent:
            return False  # would put too much of the cluster out: keep it in
        now = self._now()
        base = self._config.base_ejection_time
        decay = int((now - stats.returned_at) / base) if stats.returned_at > -math.inf else 0
        stats.times_ejected = max(0, stats.times_ejected - decay) + 1
        duration = min(base * stats.times_ejected, self._config.max_ejection_time)
        self._ejected_until[endpoint] = now + duration
        stats.consecutive_5xx = 0
        stats.consecutive_connect = 0
        self._reschedule()
        log.warning(
            "ejected %s for %.1fs (failures in a row; ejection #%d)",
            endpoint.address,
            duration,
            stats.times_ejected,
        )
        if self._on_eject is not None:
            self._on_eject(endpoint)
        if self._on_change is not None:
            self._on_change()
        return True

    def expire(self) -> bool:
        """Return endpoints whose ejection time has passed; True when any came back."""
        now = self._now()
        if now < self.next_return:
            return False
        back = [e for e, until in self._ejected_until.items() if until <= now]
        for endpoint in back:
            del self._ejected_until[endpoint]
            stats = self._stats.get(endpoint)
            if stats is not None:
                stats.returned_at = now
            log.info("%s returns from ejection", endpoint.address)
        self._reschedule()
        if back and self._on_change is not None:
            self._on_change()
        return bool(back)

    def _reschedule(self) -> None:
        self.next_return = min(self._ejected_until.values(), default=math.inf)


class HealthChecks:
    """Active-check state: an endpoint turns unhealthy after `unhealthy_threshold` failed
    probes in a row and healthy again after `healthy_threshold` passes in a row. New
    endpoints start healthy: the registry only lists instances it thinks are up."""

    def __init__(
        self, config: HealthCheckConfig, *, on_change: Callable[[], None] | None = None
    ) -> None:
        self._config = config
        self._on_change = on_change
        self._streak: dict[Endpoint, int] = {}  # >0: passes in a row, <0: failures in a row
        self._unhealthy: set[Endpoint] = set()

    @property
    def unhealthy(self) -> frozenset[Endpoint]:
        return frozenset(self._unhealthy)

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        current = set(endpoints)
        for gone in self._streak.keys() - current:
            del self._streak[gone]
        if self._unhealthy - current:
            self._unhealthy &= current
            if self._on_change is not None:
                self._on_change()
        for endpoint in current:
            self._streak.setdefault(endpoint, 0)

    def result(self, endpoint: Endpoint, ok: bool) -> bool:
        """Feed one probe result; True when the endpoint's health changed."""
        if endpoint not in self._streak:
            return False  # left the set while its probe was in flight
        streak = self._streak[endpoint]
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streak[endpoint] = streak
        changed = False
        if endpoint in self._unhealthy and streak >= self._config.healthy_threshold:
            self._unhealthy.discard(endpoint)
            changed = True
            log.info("%s passes its health checks again", endpoint.address)
        elif endpoint not in self._unhealthy and -streak >= self._config.unhealthy_threshold:
            self._unhealthy.add(endpoint)
            changed = True
            log.warning("%s fails its health checks", endpoint.address)
        if changed and self._on_change is not None:
            self._on_change()
        return changed

    def endpoints(self) -> list[Endpoint]:
        return list(self._streak)


async def http_probe(host: str, port: int, path: str, timeout: float) -> bool:
    """GET `path` over a fresh HTTP/1.1 connection; True on a 2xx within `timeout`."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: opus-health\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            status_line = await reader.readline()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    parts = status_line.split(None, 2)
    return len(parts) >= 2 and parts[1][:1] == b"2" and len(parts[1]) == 3


async def probe_app(app: AppConfig, timeout: float) -> bool:
    """Whether the local app is up: GET its health path, or for an h2c-only app (which
    does not answer HTTP/1.1) whether it accepts a connection."""
    if app.protocol != "h2c":
        return await http_probe(app.host, app.port, app.health_path, timeout)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(app.host, app.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


class ActiveChecker:
    """Probes every endpoint of one cluster each `interval`, all at once, and feeds
    `HealthChecks`. One task per cluster; stopped with the cluster."""

    def __init__(
        self,
        config: HealthCheckConfig,
        checks: HealthChecks,
        probe: Callable[[Endpoint], Awaitable[bool]] | None = None,
    ) -> None:
        self._config = config
        self._checks = checks
        self._probe = probe
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="health-checks")

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _check(self, endpoint: Endpoint) -> None:
        if self._probe is not None:
            ok = await self._probe(endpoint)
        else:
            ok = await http_probe(
                endpoint.host, endpoint.port, self._config.path, self._config.timeout
            )
        self._checks.result(endpoint, ok)

    async def _run(self) -> None:
        while True:
            endpoints = self._checks.endpoints()
            if endpoints:
                await asyncio.gather(*(self._check(e) for e in endpoints))
            await asyncio.sleep(self._config.interval)


class RegistryHealth:
    """Whether a discovery backend's registry answers, shared by all its watches.

    Logs once per outage (and once on recovery), counts every failed request in
    `opus_discovery_errors_total{backend}` and holds `opus_discovery_stale{backend}` at 1
    while calls route on the last endpoints known.
    """

    def __init__(self, backend: str, logger: logging.Logger) -> None:
        self.backend = backend
        self._log = logger
        self._metrics: Metrics | None = None
        self.stale = False

    def bind(self, metrics: Metrics) -> None:
        self._metrics = metrics
        metrics.discovery_stale.labels(self.backend).set(1 if self.stale else 0)

    def failed(self, what: str, error: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.discovery_errors.labels(self.backend).inc()
        if self.stale:
            self._log.debug("%s %s failed again: %r", self.backend, what, error)
            return
        self.stale = True
        if self._metrics is not None:
            self._metrics.discovery_stale.labels(self.backend).set(1)
        self._log.warning(
            "%s unreachable (%s: %s); routing on the last endpoints known until it is back",
            self.backend,
            what,
            error or type(error).__name__,
        )

    def ok(self) -> None:
        if not self.stale:
            return
        self.stale = False
        if self._metrics is not None:
            self._metrics.discovery_stale.labels(self.backend).set(0)
        self._log.info("%s reachable again", self.backend)
