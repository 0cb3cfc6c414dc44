"""The `rate_limit` filter: a local token bucket per filter instance.

Chains are built per service (or route), so each has its own bucket. A call takes one
token; the bucket refills at `rate` tokens a second up to `burst`. With none left the
call is answered 429 with Retry-After: the whole seconds until a token is back.
"""

from __future__ import annotations

import math
import time
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
    Response,
    error_reply,
    set_response_header,
)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    rate: float  # tokens a second
    burst: int | None = None  # bucket size; None: one second's worth (at least 1)

    def validate(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a number > 0, got {self.rate}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")


class RateLimited(MeshError):
    status = 429
    flag = "RL"


class TokenBucket:
    """Tokens refilled lazily from the clock on each take, so there is no timer."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        elapsed = max(now - self.updated, 0.0)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimitFilter(Filter):
    def __init__(
        self,
        config: RateLimitConfig,
        metrics: FilterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.limited: Counter | None = None
        if metrics is not None:
            self.limited = metrics.counter(
                "rate_limited", "Calls answered 429 by rate_limit, by service.", ["service"]
            )
        self.clock = clock
        burst = config.burst if config.burst is not None else max(1, math.ceil(config.rate))
        self.bucket = TokenBucket(config.rate, burst, clock())

    async def on_request(self, call: Call) -> Response | None:
        wait = self.bucket.take(self.clock())
        if wait == 0.0:
            return None
        if self.limited is not None:
            self.limited.labels(call.service).inc()
        error = RateLimited(f"rate limit of {self.config.rate:g}/s exceeded", service=call.service)
        response = error_reply(call, error)
        # Retry-After is whole seconds (RFC 9110 10.2.3); round up so a client that
        # honours it finds a token waiting.
        set_response_header(response, b"retry-after", str(max(1, math.ceil(wait))).encode())
        return response


def _build(config: RateLimitConfig, ctx: FilterContext) -> Filter:
    return RateLimitFilter(config, ctx.metrics, ctx.clock)


factory = FilterFactory(RateLimitConfig, _build)
