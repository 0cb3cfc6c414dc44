"""The retry core (opus_client.retry), driven with a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import httpx
import pytest

from opus_client.exceptions import CallTimeout, NonRetryableError, RetryableError
from opus_client.retry import (
    ErrorKind,
    RetryPolicy,
    RetryState,
    error_kind,
    parse_retry_after,
)

NO_JITTER = 0.5  # rng() == 0.5 makes the jitter factor exactly 1


def state(
    *, idempotent: bool = False, deadline: float | None = None, retries: int = 3, **kw: float
) -> RetryState:
    return RetryState(
        RetryPolicy(retries, 0.5),
        "payment.create",
        idempotent=idempotent,
        deadline=deadline,
        rng=lambda: NO_JITTER,
        **kw,
    )


def reply(s: RetryState, status: int, **headers: str) -> float | None:
    s.start_attempt(0.0)
    return s.after_reply(status, httpx.Headers(headers), b'{"error":"x"}', 0.0, 1_000.0)


def test_backoff_doubles_and_jitters_within_half_either_way() -> None:
    policy = RetryPolicy(5, 0.5, max_delay=3.0)
    assert [policy.backoff(n, lambda: NO_JITTER) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.backoff(2, lambda: 0.0) == 0.5
    assert policy.backoff(2, lambda: 0.999) == pytest.approx(1.499)


def test_refusals_are_resent_even_when_not_idempotent() -> None:
    s = state()
    assert reply(s, 503) == 0.5
    assert reply(s, 429) == 1.0


def test_maybe_processed_replies_are_resent_only_when_idempotent() -> None:
    with pytest.raises(RetryableError, match="not marked idempotent") as info:
        reply(state(), 502)
    assert (info.value.status, info.value.attempts) == (502, 1)
    assert info.value.body == b'{"error":"x"}'
    assert reply(state(idempotent=True), 504) == 0.5


def test_retry_after_lengthens_the_wait() -> None:
    assert reply(state(), 429, **{"retry-after": "7"}) == 7.0


def test_a_wait_past_the_deadline_gives_up_at_once() -> None:
    with pytest.raises(RetryableError, match="would pass the deadline") as info:
        reply(state(deadline=5.0), 429, **{"retry-after": "7"})
    assert not isinstance(info.value, CallTimeout)


def test_a_failure_the_mesh_already_retried_is_not_resent() -> None:
    with pytest.raises(RetryableError, match="mesh already made 3 attempts"):
        reply(state(), 503, **{"x-opus-attempt-count": "3"})
    assert reply(state(), 503, **{"x-opus-attempt-count": "1"}) == 0.5


@pytest.mark.parametrize("status", [400, 401, 404, 409, 500, 501])
def test_final_errors_carry_status_and_body(status: int) -> None:
    with pytest.raises(NonRetryableError) as info:
        reply(state(), status)
    assert info.value.status == status
    assert info.value.text == '{"error":"x"}'


def test_success_is_returned() -> None:
    assert reply(state(), 200) is None
    assert reply(state(), 302) is None


def test_gives_up_after_max_retries() -> None:
    s = state(retries=2)
    assert reply(s, 503) is not None
    assert reply(s, 503) is not None
    with pytest.raises(RetryableError, match="gave up after 3 attempts") as info:
        reply(s, 503)
    assert info.value.attempts == 3


def test_transport_failures_by_kind() -> None:
    s = state()
    s.start_attempt(0.0)
    assert s.after_error(ErrorKind.NOT_SENT, "refused", 0.0) == 0.5
    s.start_attempt(0.0)
    with pytest.raises(RetryableError, match="not marked idempotent"):
        s.after_error(ErrorKind.RESET, "reset", 0.0)
    s = state(idempotent=True)
    s.start_attempt(0.0)
    assert s.after_error(ErrorKind.RESET, "reset", 0.0) == 0.5


def test_deadline_bounds_attempts_and_ends_in_call_timeout() -> None:
    s = state(deadline=2.0, attempt_timeout=0.5, idempotent=True)
    assert s.start_attempt(0.0) == 0.5  # the attempt bound is the shorter
    assert s.after_error(ErrorKind.TIMEOUT, "", 0.5) == 0.5  # an attempt timeout: resend
    assert s.start_attempt(1.8) == pytest.approx(0.2)  # now the deadline is the shorter
    with pytest.raises(CallTimeout) as info:
        s.after_error(ErrorKind.TIMEOUT, "", 2.0)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(CallTimeout):
        s.start_attempt(2.5)


def test_error_kind_maps_httpx_errors() -> None:
    req = httpx.Request("POST", "http://x/")
    assert error_kind(httpx.ConnectError("refused", request=req)) is ErrorKind.NOT_SENT
    assert error_kind(httpx.PoolTimeout("full", request=req)) is ErrorKind.NOT_SENT
    assert error_kind(httpx.ReadTimeout("slow", request=req)) is ErrorKind.TIMEOUT
    assert error_kind(httpx.ReadError("reset", request=req)) is ErrorKind.RESET
    assert error_kind(httpx.RemoteProtocolError("eof", request=req)) is ErrorKind.RESET


def test_parse_retry_after() -> None:
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 4.0) == 6.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


def test_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(-1)


def test_the_mesh_504_at_the_deadline_is_a_call_timeout() -> None:
    s = state(deadline=1.0, idempotent=True)
    s.start_attempt(0.0)
    with pytest.raises(CallTimeout) as info:
        s.after_reply(504, httpx.Headers(), b"", 0.99, 0.0)
    assert info.value.status == 504
    s = state(deadline=10.0, idempotent=True)  # a 504 well before it is a gateway failure
    assert reply(s, 504) == 0.5
