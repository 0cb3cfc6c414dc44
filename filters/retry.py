"""The `retry` filter: send a failed call again, to another endpoint where there is one.

What is retried: connect failures and refused streams (the peer never saw the call, so
any method), and, for idempotent methods or calls marked retryable, resets before the
response head, 502/503/504 (configurable), gRPC UNAVAILABLE and per-try timeouts.
Retries back off exponentially with jitter, stop at the call's deadline, and share a
budget (Envoy's: retries in flight at most `budget_percent` of the calls in flight
through this filter, never fewer than `min_retry_concurrency`), so that when a whole
service is down its callers do not multiply the load on it.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter

from filters.timeout import timeouts_counter
from sidecar.sdk import (
    Call,
    Filter,
    FilterContext,
    FilterFactory,
    FilterMetrics,
    Headers,
    Next,
    Request,
    Response,
    StreamRefused,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
    error_reply,
    fixed_body,
    set_response_header,
)

RetryOn = Literal[
    "connect-failure",
    "refused-stream",
    "reset",
    "retriable-status-codes",
    "unavailable",
    "per-try-timeout",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
]
ALL_CONDITIONS: tuple[RetryOn, ...] = (
    "connect-failure",
    "refused-stream",
    "reset",
    "retriable-status-codes",
    "unavailable",
    "per-try-timeout",
)
# Conditions under which the peer provably never saw the call: safe for any method.
_NEVER_SEEN = frozenset({"connect-failure", "refused-stream"})
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
RETRYABLE_HEADER = b"x-opus-retryable"
ATTEMPT_COUNT_HEADER = b"x-opus-attempt-count"  # on the reply when the mesh retried
GRPC_UNAVAILABLE = b"14"
# A gRPC reply's status (in a trailers-only reply's head) -> the retry_on condition it meets.
GRPC_CONDITIONS: dict[bytes, RetryOn] = {
    b"1": "cancelled",
    b"4": "deadline-exceeded",
    b"8": "resource-exhausted",
    b"13": "internal",
    GRPC_UNAVAILABLE: "unavailable",
}

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 3
    retry_delay: float = 0.5  # the first retry's backoff ceiling; doubles per retry
    max_delay: float = 5.0  # the backoff ceiling never grows past this
    retry_on: tuple[RetryOn, ...] = ALL_CONDITIONS
    retriable_status_codes: tuple[int, ...] = (502, 503, 504)
    per_try_timeout: float | None = None  # seconds until each try's response head
    budget_percent: float = 20.0
    min_retry_concurrency: int = 3

    def validate(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.retry_delay < 0 or self.max_delay < self.retry_delay:
            raise ValueError(
                f"need 0 <= retry_delay <= max_delay, got {self.retry_delay} and {self.max_delay}"
            )
        if self.per_try_timeout is not None and not self.per_try_timeout > 0:
            raise ValueError(f"per_try_timeout must be > 0, got {self.per_try_timeout}")
        if not 0 <= self.budget_percent <= 100:
            raise ValueError(f"budget_percent must be in 0..100, got {self.budget_percent}")
        if self.min_retry_concurrency < 0:
            raise ValueError(
                f"min_retry_concurrency must be >= 0, got {self.min_retry_concurrency}"
            )
        for code in self.retriable_status_codes:
            if not 100 <= code <= 599:
                raise ValueError(f"retriable_status_codes: {code} is not an HTTP status")


class PerTryTimeout(UpstreamTimeout):
    """One try ran past per_try_timeout (the peer may have seen it)."""


class _Replay:
    """Makes the request body sendable again for a retry.

    A body already whole in memory (buffered by a filter's read_body(), or small and
    complete on arrival) is kept and resent at any size; a streamed one relies on
    Body.rewind(), which keeps only the first 64 KiB read.
    """

    __slots__ = ("data", "trailers")

    def __init__(self, request: Request) -> None:
        self.data: bytes | None = None
        self.trailers: Headers | None = None
        body = request.body
        if body.complete:
            self.data = body.read_nowait() or b""
            self.trailers = body.trailers
            request.body = fixed_body(self.data, self.trailers)

    def rewind(self, request: Request) -> bool:
        if self.data is not None:
            request.body = fixed_body(self.data, self.trailers)
            return True
        return request.body.rewind()


class RetryFilter(Filter):
    def __init__(
        self,
        config: RetryConfig,
        metrics: FilterMetrics | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.retries: Counter | None = None
        self.refused: Counter | None = None
        self.timeouts: Counter | None = None
        if metrics is not None:
            self.retries = metrics.counter(
                "retries", "Retries sent by the retry filter, by service.", ["service"]
            )
            self.refused = metrics.counter(
                "retry_budget_exhausted",
                "Retries the retry budget refused (the last response was returned), by service.",
                ["service"],
            )
            self.timeouts = timeouts_counter(metrics)
        self.sleep = sleep
        self.rand = rand
        self.clock = clock
        self.conditions = frozenset(config.retry_on)
        self.statuses = frozenset(config.retriable_status_codes)
        self.active = 0  # calls in flight through this filter
        self.retries_in_flight = 0  # retries from their backoff to their response head

    async def handle(self, call: Call, next: Next) -> Response:
        marked = call.header(RETRYABLE_HEADER)
        if marked is not None:
            call.remove_header(RETRYABLE_HEADER)  # ours, not the upstream's
            if marked.strip().lower() == b"true":
                call.retryable = True
        replay = _Replay(call.request)
        self.active += 1
        try:
            response = await self._run(call, next, replay)
        finally:
            self.active -= 1
        tries = call.tries
        if tries > 1:
            # Tells the caller (opus_client) the mesh already retried, so it does not
            # retry on top and multiply the attempts.
            set_response_header(response, ATTEMPT_COUNT_HEADER, str(tries).encode())
        return response

    async def _run(self, call: Call, next: Next, replay: _Replay) -> Response:
        response = await self._try(call, next)
        for retry in range(1, self.config.max_retries + 1):
            condition = self.retry_condition(call, response)
            if condition is None or not self._may_resend(call, condition):
                return response
            if not self.budget_allows():
                if self.refused is not None:
                    self.refused.labels(call.service).inc()
                return response
            delay = self.backoff(retry)
            if call.deadline is not None and self.clock() + delay >= call.deadline:
                return response  # the retry could not finish in time anyway
            if not replay.rewind(call.request):
                return response  # a streamed body past 64 KiB is gone
            response.body.cancel()  # discarded: stop the upstream sending it
            self.retries_in_flight += 1
            try:
                await self.sleep(delay)
                if self.retries is not None:
                    self.retries.labels(call.service).inc()
                response = await self._try(call, next)
            finally:
                self.retries_in_flight -= 1
        condition = self.retry_condition(call, response)
        if condition is not None and self._may_resend(call, condition):
            call.set_flags("URX")
        return response

    async def _try(self, call: Call, next: Next) -> Response:
        # call.error and flags describe the latest try; the router sets them only on failure.
        call.begin_try()
        per_try = self.config.per_try_timeout
        if per_try is None:
            return await next(call)
        try:
            async with asyncio.timeout(per_try) as scope:
                return await next(call)
        except TimeoutError:
            if not scope.expired():
                raise
        if self.timeouts is not None:
            self.timeouts.labels(call.service, "per_try").inc()
        error = PerTryTimeout(f"try exceeded per_try_timeout {per_try:g}s", service=call.service)
        return error_reply(call, error)

    def retry_condition(self, call: Call, response: Response) -> str | None:
        """Which configured retry_on condition this try's outcome meets, if any."""
        error = call.error
        condition: str | None = None
        if error is not None:
            if isinstance(error, UpstreamConnectError):
                condition = "connect-failure"
            elif isinstance(error, StreamRefused):
                condition = "refused-stream"
            elif isinstance(error, UpstreamReset):
                condition = "reset"  # the router only sees resets before the response head
            elif isinstance(error, PerTryTimeout):
                condition = "per-try-timeout"
            # Other mesh errors (no endpoint, overflow, a filter's refusal) are not retried.
        elif response.status in self.statuses:
            condition = "retriable-status-codes"
        elif call.request.is_grpc:
            grpc_status = _header(response, b"grpc-status")
            if grpc_status is not None:
                condition = GRPC_CONDITIONS.get(grpc_status)
        return condition if condition in self.conditions else None

    def _may_resend(self, call: Call, condition: str) -> bool:
        if condition in _NEVER_SEEN:
            return True
        return call.retryable or call.request.method in IDEMPOTENT_METHODS

    def budget_allows(self) -> bool:
        allowed = max(
            self.config.min_retry_concurrency, self.config.budget_percent / 100 * self.active
        )
        return self.retries_in_flight < allowed

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (1-based): in [ceiling/2, ceiling).

        The ceiling doubles from retry_delay up to max_delay; the jitter keeps callers
        that failed together from retrying together.
        """
        exponent = min(retry - 1, 62)  # 2**62 * any delay is past max_delay already
        ceiling = min(self.config.max_delay, self.config.retry_delay * math.ldexp(1.0, exponent))
        return ceiling * (0.5 + 0.5 * self.rand())


def _header(response: Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None


def _build(config: RetryConfig, ctx: FilterContext) -> Filter:
    return RetryFilter(config, ctx.metrics, clock=ctx.clock)


factory = FilterFactory(RetryConfig, _build)
