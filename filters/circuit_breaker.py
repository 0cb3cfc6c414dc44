"""The `circuit_breaker` filter: concurrency limits and a consecutive-failure breaker.

Limits (Envoy's cluster circuit breakers): at most `max_requests` calls in flight to
the upstream; up to `max_pending` more wait (at most `pending_timeout`) for a slot;
beyond that the call is answered 503 `x-opus-overloaded: true` (flag UO).

Breaker: `consecutive_failures` failures in a row (5xx, connect errors, resets,
timeouts, gRPC UNAVAILABLE) open it; while open, calls are answered 503
`x-opus-circuit: open` (flag CO) without touching the upstream. After
`open_duration` it lets `max_half_open_probes` calls through: a probe's success
closes it, a failure opens it again for another `open_duration`.
State is per filter instance, and chains are built per service (or route).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from sidecar.sdk import (
    Call,
    Filter,
    FilterContext,
    FilterFactory,
    FilterMetrics,
    MeshError,
    Next,
    Response,
    StreamRefused,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
    error_reply,
    set_response_header,
)

_UPSTREAM_FAILURES = (UpstreamConnectError, StreamRefused, UpstreamReset, UpstreamTimeout)


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    max_requests: int = 1024  # calls in flight to the upstream (Envoy's default)
    max_pending: int = 1024  # calls waiting for one of those slots
    pending_timeout: float = 1.0  # how long a call may wait for a slot
    consecutive_failures: int = 5
    open_duration: float = 10.0
    max_half_open_probes: int = 1

    def validate(self) -> None:
        for name in ("max_requests", "consecutive_failures", "max_half_open_probes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {self.max_pending}")
        for name in ("pending_timeout", "open_duration"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number > 0, got {value}")


class Overloaded(MeshError):
    flag = "UO"  # upstream overflow: the limits said no


class CircuitOpen(MeshError):
    flag = "CO"


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """The consecutive-failure state machine, driven by an injected clock."""

    def __init__(self, config: CircuitBreakerConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probes = 0  # half-open probes in flight

    def admit(self) -> bool | None:
        """None: refuse; False: admit normally; True: admit as a half-open probe."""
        if self.state is State.OPEN:
            if self.clock() - self.opened_at < self.config.open_duration:
                return None
            self.state = State.HALF_OPEN
            self.probes = 0
        if self.state is State.HALF_OPEN:
            if self.probes >= self.config.max_half_open_probes:
                return None
            self.probes += 1
            return True
        return False

    def record(self, probe: bool, failed: bool) -> str | None:
        """Account one finished call; the reason when it opened the breaker."""
        if probe:
            self.probes -= 1
            if self.state is not State.HALF_OPEN:
                return None
            if failed:
                self._open()
                return "probe_failed"
            self.state = State.CLOSED
            self.failures = 0
            return None
        if self.state is not State.CLOSED:
            return None  # a call admitted before the trip says nothing about now
        if not failed:
            self.failures = 0
            return None
        self.failures += 1
        if self.failures >= self.config.consecutive_failures:
            self._open()
            return "consecutive_failures"
        return None

    def abandon_probe(self) -> None:
        """A probe was cancelled before it had an outcome: let another one try."""
        self.probes -= 1

    def _open(self) -> None:
        self.state = State.OPEN
        self.opened_at = self.clock()
        self.failures = 0


class CircuitBreakerFilter(Filter):
    def __init__(
        self,
        config: CircuitBreakerConfig,
        metrics: FilterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.openings: Counter | None = None
        if metrics is not None:
            self.openings = metrics.counter(
                "circuit_open",
                "Times a circuit breaker opened, by service and reason "
                "(consecutive_failures or probe_failed).",
                ["service", "reason"],
            )
        self.breaker = Breaker(config, clock)
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def handle(self, call: Call, next: Next) -> Response:
        probe = self.breaker.admit()
        if probe is None:
            opened = CircuitOpen(f"circuit to {call.service!r} is open", service=call.service)
            return self._refuse(call, opened, b"x-opus-circuit", b"open")
        if not await self._acquire():
            if probe:
                self.breaker.abandon_probe()
            overloaded = Overloaded(f"too many calls to {call.service!r}", service=call.service)
            return self._refuse(call, overloaded, b"x-opus-overloaded", b"true")
        outcome: bool | None = None
        try:
            response = await next(call)
            outcome = is_failure(call, response)
            return response
        finally:
            self._release()
            if outcome is None:
                if probe:
                    self.breaker.abandon_probe()  # cancelled or raised: no verdict
            else:
                reason = self.breaker.record(probe, outcome)
                if reason is not None and self.openings is not None:
                    self.openings.labels(call.service, reason).inc()

    async def _acquire(self) -> bool:
        if self.active < self.config.max_requests:
            self.active += 1
            return True
        if len(self.waiters) >= self.config.max_pending:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.config.pending_timeout):
                await waiter  # _release hands its slot over: self.active already counts us
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):  # _release may have dropped it
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def _release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the oldest waiter
                return
        self.active -= 1

    def _refuse(self, call: Call, error: MeshError, name: bytes, value: bytes) -> Response:
        response = error_reply(call, error)
        set_response_header(response, name, value)
        return response


def is_failure(call: Call, response: Response) -> bool:
    """What counts against the breaker: 5xx, upstream errors, gRPC UNAVAILABLE."""
    error = call.error
    if isinstance(error, _UPSTREAM_FAILURES):
        return True
    if error is not None:
        return False  # a filter's own refusal (429, 401) says nothing of the upstream
    if response.status >= 500:
        return True
    return call.request.is_grpc and any(
        n == b"grpc-status" and v == b"14" for n, v in response.headers
    )


def _build(config: CircuitBreakerConfig, ctx: FilterContext) -> Filter:
    return CircuitBreakerFilter(config, ctx.metrics, ctx.clock)


factory = FilterFactory(CircuitBreakerConfig, _build)
