"""The `timeout` filter: one deadline for the whole call, retries included.

It sets `call.deadline` (a `time.monotonic()` instant); the router turns what is left
of it into `x-opus-deadline-ms` on every try, and gRPC calls also carry `grpc-timeout`
(set here, refreshed by the router per try) so the server's own gRPC stack sees it.
A deadline that arrives with the request (`x-opus-deadline-ms` from a peer sidecar,
`grpc-timeout` from a gRPC client) can only shorten the call, never lengthen it.
On expiry the inner call is cancelled, which resets the upstream stream, and the
caller gets 504 (DEADLINE_EXCEEDED over gRPC).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from prometheus_client import Counter

from sidecar.sdk import (
    DEADLINE_HEADER,
    GRPC_TIMEOUT_HEADER,
    Call,
    Filter,
    FilterContext,
    FilterFactory,
    FilterMetrics,
    Next,
    Response,
    UpstreamTimeout,
    format_grpc_timeout,
    parse_grpc_timeout,
)


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    timeout: float = 15.0  # seconds for the whole call; Envoy's route default

    def validate(self) -> None:
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a number > 0, got {self.timeout}")


def timeouts_counter(metrics: FilterMetrics) -> Counter:
    """opus_timeouts{service,kind}: `timeout` counts kind="overall", `retry` kind="per_try"."""
    return metrics.counter(
        "timeouts",
        "Calls or tries cut off by a timeout, by service and kind (overall or per_try).",
        ["service", "kind"],
    )


def incoming_timeout(call: Call) -> float | None:
    """The smallest deadline (seconds from now) the request carries, if any."""
    found: list[float] = []
    raw_ms = call.header(DEADLINE_HEADER)
    if raw_ms is not None and raw_ms.isdigit():
        found.append(int(raw_ms) / 1000)
    raw_grpc = call.header(GRPC_TIMEOUT_HEADER)
    if raw_grpc is not None:
        seconds = parse_grpc_timeout(raw_grpc)
        if seconds is not None:
            found.append(seconds)
    return min(found) if found else None


class TimeoutFilter(Filter):
    def __init__(
        self,
        config: TimeoutConfig,
        metrics: FilterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.timeouts = timeouts_counter(metrics) if metrics is not None else None
        self.clock = clock

    async def handle(self, call: Call, next: Next) -> Response:
        now = self.clock()
        budget = self.config.timeout
        # A deadline the request carries can only shorten the call, never lengthen it.
        # (The proxy already sets call.deadline from it; reading the headers here too
        # keeps the filter right in any chain, and min() makes the two agree.)
        incoming = incoming_timeout(call)
        if incoming is not None:
            budget = min(budget, incoming)
        deadline = now + budget
        if call.deadline is not None:  # the proxy's or an outer filter's deadline binds
            deadline = min(deadline, call.deadline)
        call.deadline = deadline
        if call.request.is_grpc:
            # The router refreshes grpc-timeout on every try once the call carries one.
            call.set_header(GRPC_TIMEOUT_HEADER, format_grpc_timeout(deadline - now))
        remaining = deadline - now
        if remaining <= 0:
            self._expired(call, budget)
        # The wait runs on the loop's clock; only the arithmetic above uses self.clock,
        # so tests can check the deadline math without waiting for it.
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + remaining) as scope:
                return await next(call)
        except TimeoutError:
            if not scope.expired():
                raise  # a TimeoutError from inside, not our deadline
            self._expired(call, budget)

    def _expired(self, call: Call, budget: float) -> NoReturn:
        if self.timeouts is not None:
            self.timeouts.labels(call.service, "overall").inc()
        raise UpstreamTimeout(
            f"call to {call.service!r} exceeded its deadline ({budget:g}s)",
            service=call.service,
        )


def _build(config: TimeoutConfig, ctx: FilterContext) -> Filter:
    return TimeoutFilter(config, ctx.metrics, ctx.clock)


factory = FilterFactory(TimeoutConfig, _build)
