"""The attempt loop both clients share (opus_client._steps), driven by hand: no I/O."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from opus_client import _steps
from opus_client._call import PreparedCall, make_settings
from opus_client._steps import Send, Wait, advance, call_steps
from opus_client.exceptions import ClientClosedError, RetryableError
from opus_client.response import Response


def prepared(idempotent: bool = False) -> PreparedCall:
    settings = make_settings("http://sidecar:8080", 2, 0.0, 5.0, None, None, None, None)
    return PreparedCall(
        settings, "payment", "create", {"a": 1}, None, None, idempotent, time.monotonic()
    )


@pytest.fixture
def build() -> Iterator[_steps.BuildRequest]:
    with httpx.Client() as client:
        yield client.build_request


def test_a_refusal_waits_then_resends_and_the_reply_ends_the_call(
    build: _steps.BuildRequest,
) -> None:
    steps = call_steps(prepared(), build, lambda: False)
    first = advance(steps, None)
    assert isinstance(first, Send)
    request = first.request("tok")
    assert request.url == "http://sidecar:8080/v1/invoke/payment/create"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["x-opus-client-attempt"] == "1"
    wait = advance(steps, httpx.Response(503))
    assert isinstance(wait, Wait)
    second = advance(steps, None)
    assert isinstance(second, Send)
    assert second.request(None).headers["x-opus-client-attempt"] == "2"
    done = advance(steps, httpx.Response(200, content=b"ok"))
    assert isinstance(done, Response)
    assert (done.status_code, done.content, done.attempts) == (200, b"ok", 2)


def test_a_reset_of_a_call_not_idempotent_is_not_resent(build: _steps.BuildRequest) -> None:
    steps = call_steps(prepared(), build, lambda: False)
    advance(steps, None)
    with pytest.raises(RetryableError, match="not marked idempotent"):
        advance(steps, httpx.ReadError("reset"))


def test_a_transport_error_on_a_closed_client_says_closed(build: _steps.BuildRequest) -> None:
    closed = [False]
    steps = call_steps(prepared(True), build, lambda: closed[0])
    advance(steps, None)
    closed[0] = True
    with pytest.raises(ClientClosedError, match="closed during the call"):
        advance(steps, httpx.ReadError("reset"))
