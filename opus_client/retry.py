"""When to resend a call and how long to wait first: the retry core, with no I/O.

Both clients drive one `RetryState` per call: `start_attempt()` before each send,
then `after_reply()` or `after_error()` with what happened, which either return the
delay before the next attempt, or (for a reply) None to hand it to the caller, or
raise the error that ends the call. The clock is passed in (`now`), so every rule
here is tested without sleeping.

What is resent (docs/client.md explains how this combines with the mesh's retries):
  - always: failures the app provably never saw — connection refused or timed out
    while connecting, no pooled connection free — and refusals: 429 and 503
    (after Retry-After when given);
  - only when the call is idempotent: failures after the request went out — a reset,
    502, 504, an attempt timeout — since the app may have processed it;
  - never: a failed reply whose `x-opus-attempt-count` says the mesh already retried it,
    other 4xx and 5xx, or anything once the deadline has passed.
"""

from __future__ import annotations

import email.utils
import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from opus_client.exceptions import CallTimeout, NonRetryableError, RetryableError

# The mesh's attempts at one call, on its reply (Envoy's x-envoy-attempt-count).
ATTEMPT_COUNT_HEADER = "x-opus-attempt-count"
REFUSALS = frozenset({429, 503})  # the app (or the mesh) declined the call unprocessed
MAYBE_PROCESSED = frozenset({502, 504})  # a gateway failed after passing the call on
# The mesh enforces the deadline the client sends (x-opus-deadline-ms), so its 504 can
# beat the client's own timer by the header's rounding and the trip back.
DEADLINE_SLACK = 0.05


class ErrorKind(enum.Enum):
    NOT_SENT = "connection failed before the request was sent"
    RESET = "connection failed after the request was sent"
    TIMEOUT = "timed out"


def error_kind(exc: httpx.TransportError) -> ErrorKind:
    """Map httpx's transport errors (the I/O boundary) onto what they mean for a resend."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return ErrorKind.NOT_SENT
    if isinstance(exc, httpx.TimeoutException):
        return ErrorKind.TIMEOUT
    return ErrorKind.RESET


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`max_retries` resends at most, the n-th after about retry_delay * 2**(n-1) seconds."""

    max_retries: int = 3
    retry_delay: float = 0.5
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {self.max_retries}")
        if self.retry_delay < 0 or self.max_delay < 0:
            raise ValueError("retry_delay and max_delay must be 0 or more")

    def backoff(self, retry: int, rng: Callable[[], float]) -> float:
        """The wait before resend number `retry` (1-based): exponential, with +-50% jitter
        so that clients failed by the same outage do not come back in step."""
        base = min(self.max_delay, self.retry_delay * 2.0 ** (retry - 1))
        return base * (0.5 + rng())


def parse_retry_after(value: str | None, wall_now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - wall_now)


class RetryState:
    """The retry bookkeeping of one call. `deadline` and `now` are monotonic seconds."""

    def __init__(
        self,
        policy: RetryPolicy,
        what: str,
        *,
        idempotent: bool,
        deadline: float | None,
        attempt_timeout: float | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.what = what
        self.idempotent = idempotent
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.rng = rng
        self.attempts = 0
        self._bounded_by_deadline = False

    def start_attempt(self, now: float) -> float | None:
        """Count an attempt; returns its timeout (None: unbounded)."""
        self.attempts += 1
        timeout = self.attempt_timeout
        self._bounded_by_deadline = False
        if self.deadline is not None:
            left = self.deadline - now
            if left <= 0:
                raise CallTimeout(f"{self.what}: deadline passed", attempts=self.attempts - 1)
            if timeout is None or left <= timeout:
                timeout, self._bounded_by_deadline = left, True
        return timeout

    def after_reply(
        self, status: int, headers: httpx.Headers, body: bytes, now: float, wall_now: float
    ) -> float | None:
        """None: the reply is the call's result. Else the delay before resending."""
        if status < 400:
            return None
        if status not in REFUSALS and status not in MAYBE_PROCESSED:
            raise NonRetryableError(
                f"{self.what}: {status} {_snippet(body)}", status=status, body=body, headers=headers
            )
        why = f"{status} {_snippet(body)}"
        if status == 504 and self.deadline is not None and self.deadline - now <= DEADLINE_SLACK:
            raise CallTimeout(
                f"{self.what}: {why}: deadline passed",
                attempts=self.attempts,
                status=status,
                body=body,
                headers=headers,
            )
        if status in MAYBE_PROCESSED and not self.idempotent:
            raise RetryableError(
                f"{self.what}: {why}; not resent: the app may have processed it and the call "
                f"is not marked idempotent",
                attempts=self.attempts,
                status=status,
                body=body,
                headers=headers,
            )
        mesh_attempts = _int(headers.get(ATTEMPT_COUNT_HEADER))
        if mesh_attempts > 1:
            raise RetryableError(
                f"{self.what}: {why}; not resent: the mesh already made {mesh_attempts} attempts",
                attempts=self.attempts,
                status=status,
                body=body,
                headers=headers,
            )
        wait = parse_retry_after(headers.get("retry-after"), wall_now)
        return self._next_delay(why, now, wait, status=status, body=body, headers=headers)

    def after_error(self, kind: ErrorKind, detail: str, now: float) -> float:
        """The delay before resending after a transport failure, or raise."""
        why = f"{kind.value} ({detail})" if detail else kind.value
        if kind is ErrorKind.TIMEOUT and self._bounded_by_deadline:
            raise CallTimeout(f"{self.what}: {why}: deadline passed", attempts=self.attempts)
        if kind is not ErrorKind.NOT_SENT and not self.idempotent:
            error = CallTimeout if kind is ErrorKind.TIMEOUT else RetryableError
            raise error(
                f"{self.what}: {why}; not resent: the app may have processed it and the call "
                f"is not marked idempotent",
                attempts=self.attempts,
            )
        return self._next_delay(why, now, None)

    def _next_delay(
        self,
        why: str,
        now: float,
        retry_after: float | None,
        *,
        status: int | None = None,
        body: bytes = b"",
        headers: httpx.Headers | None = None,
    ) -> float:
        if self.attempts > self.policy.max_retries:
            raise RetryableError(
                f"{self.what}: {why}; gave up after {self.attempts} attempts",
                attempts=self.attempts,
                status=status,
                body=body,
                headers=headers,
            )
        delay = self.policy.backoff(self.attempts, self.rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if self.deadline is not None and now + delay >= self.deadline:
            raise RetryableError(
                f"{self.what}: {why}; not resent: waiting {delay:.2f}s would pass the deadline",
                attempts=self.attempts,
                status=status,
                body=body,
                headers=headers,
            )
        return delay


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", errors="replace").strip()
    return text + ("..." if len(body) > limit else "")
