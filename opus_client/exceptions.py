"""The client's exception tree: every error a call raises derives from `OpusError`.

    OpusError
    ├── RetryableError        transient: retries spent, or a resend was not safe
    │   └── CallTimeout       the call's deadline passed (also a TimeoutError)
    ├── NonRetryableError     a final answer: 4xx other than 429, 5xx other than 502/503/504
    ├── TokenError            the auth token provider failed
    ├── DecodeError           a reply body is not what the caller asked to decode it as
    └── ClientClosedError     the client was closed

httpx's exceptions never escape a call: `opus_client.retry.error_kind()` maps them
at the I/O boundary and the retry core turns them into the errors above.
"""

from __future__ import annotations

import httpx


class OpusError(Exception):
    """Base of every error raised by opus_client."""


class RetryableError(OpusError):
    """A transient failure that the client stopped retrying.

    Either the retries were spent, or resending was not safe (the call may have reached
    the app and was not marked idempotent), or the mesh had already retried it. `status`
    is None when no HTTP reply came back (connection refused or reset, timeout).
    """

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        status: int | None = None,
        body: bytes = b"",
        headers: httpx.Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else httpx.Headers()


class CallTimeout(RetryableError, TimeoutError):
    """The call's deadline (its `timeout`) passed before a reply came back."""


class NonRetryableError(OpusError):
    """The service (or the mesh) gave a final error reply; resending would not change it."""

    def __init__(self, message: str, *, status: int, body: bytes, headers: httpx.Headers) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class TokenError(OpusError):
    """The auth token provider raised or returned something that is not a token."""


class DecodeError(OpusError, ValueError):
    """A reply body could not be decoded as the type asked for."""


class ClientClosedError(OpusError, RuntimeError):
    """A call was made on (or was pending when closing) a closed client."""
