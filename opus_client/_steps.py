"""One call's attempts, written once for both clients: a Sans-IO generator.

`call_steps()` holds the whole attempt loop (closed checks, the deadline, the
per-attempt headers, what a reply or a transport failure means, the wait before a
resend) and does no I/O: it yields a step, and the client's shell carries it out and
sends back what happened.

    Send(request, timeout)  fetch the token, build the request with it, send it;
                            send back the httpx.Response, or the exception that the
                            send raised (an httpx.TransportError, or TimeoutError
                            when the shell bounds the attempt itself)
    Wait(delay)             sleep `delay` seconds before the next attempt; send None

The generator returns the call's `Response` or raises the error that ends the call,
so `OpusClient` and `AsyncOpusClient` differ only in how they wait, send and
fetch a token: blocking, or awaited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx

from opus_client._call import PreparedCall
from opus_client.exceptions import ClientClosedError
from opus_client.response import Response
from opus_client.retry import ErrorKind, error_kind

log = logging.getLogger("opus_client")

# httpx.Client.build_request and httpx.AsyncClient.build_request alike.
BuildRequest = Callable[..., httpx.Request]
Outcome = httpx.Response | Exception | None


@dataclass(frozen=True, slots=True)
class Send:
    """Send one attempt: `request(token)` builds it with the token fetched for it."""

    prepared: PreparedCall
    build_request: BuildRequest
    timeout: float | None

    def request(self, token: str | None) -> httpx.Request:
        return self.build_request(
            "POST",
            self.prepared.url,
            content=self.prepared.content,
            headers=self.prepared.attempt_headers(self.timeout, token, time.time()),
            timeout=self.timeout,
        )


@dataclass(frozen=True, slots=True)
class Wait:
    delay: float


Step = Send | Wait


def call_steps(
    prepared: PreparedCall, build_request: BuildRequest, closed: Callable[[], bool]
) -> Generator[Step, Outcome, Response]:
    state = prepared.state
    while True:
        if closed():
            raise ClientClosedError("the client is closed")
        time_left = state.start_attempt(time.monotonic())
        outcome = yield Send(prepared, build_request, time_left)
        if isinstance(outcome, httpx.Response):
            status, content = outcome.status_code, outcome.content
            wait = state.after_reply(
                status, outcome.headers, content, time.monotonic(), time.time()
            )
            if wait is None:
                return Response(status, outcome.headers, content, state.attempts)
            delay = wait
        elif isinstance(outcome, httpx.TransportError):
            if closed():
                raise ClientClosedError("the client was closed during the call") from outcome
            detail = str(outcome) or type(outcome).__name__
            delay = state.after_error(error_kind(outcome), detail, time.monotonic())
        elif isinstance(outcome, TimeoutError):
            delay = state.after_error(ErrorKind.TIMEOUT, "", time.monotonic())
        else:
            raise TypeError(f"a Send step takes a reply or a send's exception, not {outcome!r}")
        log.debug("%s: attempt %d failed; resending in %.3fs", state.what, state.attempts, delay)
        yield Wait(delay)


def advance(steps: Generator[Step, Outcome, Response], outcome: Outcome) -> Step | Response:
    """Send `outcome` into `steps` (None to start them): the next step, or the call's
    Response when it is done."""
    try:
        return steps.send(outcome)
    except StopIteration as done:
        response: Response = done.value
        return response
