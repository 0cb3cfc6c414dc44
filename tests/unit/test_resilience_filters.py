"""The resilience filters (retry, timeout, rate_limit, circuit_breaker, headers), driven
with in-memory calls, a scripted fake router, and fake clocks and sleeps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from filters import circuit_breaker, headers, rate_limit, retry, timeout
from filters.circuit_breaker import CircuitBreakerConfig, CircuitBreakerFilter, State
from filters.headers import HeadersConfig, HeadersFilter
from filters.rate_limit import RateLimitConfig, RateLimitFilter
from filters.retry import RetryConfig, RetryFilter
from filters.timeout import TimeoutConfig, TimeoutFilter
from sidecar.call import Call
from sidecar.chain import compose
from sidecar.config import ConfigError, load_config
from sidecar.deadline import format_grpc_timeout
from sidecar.errors import (
    MeshError,
    NoHealthyUpstream,
    StreamRefused,
    UpstreamConnectError,
    UpstreamReset,
    error_response,
)
from sidecar.messages import REPLAY_LIMIT, Body, Headers, Request, Response, fixed_body
from sidecar.metrics import Metrics

GRPC = [(b"content-type", b"application/grpc")]


def make_call(
    method: bytes = b"GET",
    hdrs: Headers | None = None,
    body: Body | bytes = b"",
    service: str = "inventory",
) -> Call:
    request = Request(
        method,
        b"/x",
        b"inventory",
        list(hdrs or []),
        body if isinstance(body, Body) else fixed_body(body),
    )
    return Call(request, "outbound", service, b"inventory", b"/x", 1 << 20)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


Outcome = int | MeshError | Response | Callable[[Call], Awaitable[Response]]


class Router:
    """A fake router step: each try takes the next scripted outcome (the last repeats).

    Like the real one it counts tries, reads the request body, and reports a mesh
    failure as an error response with call.error set.
    """

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.bodies: list[bytes] = []
        self.sent: list[Headers] = []
        self.cancelled: list[int] = []  # which discarded responses had their body cancelled

    @property
    def tries(self) -> int:
        return len(self.sent)

    async def __call__(self, call: Call) -> Response:
        index = len(self.sent)
        self.sent.append(list(call.request.headers))
        parts = []
        while chunk := await call.request.body.read():
            parts.append(chunk)
        self.bodies.append(b"".join(parts))
        call._tries += 1  # the router's own bookkeeping, as sidecar/callbacks.py keeps it
        outcome = self.outcomes[min(index, len(self.outcomes) - 1)]
        if callable(outcome):
            return await outcome(call)
        if isinstance(outcome, MeshError):
            call._error = outcome
            call._flags = outcome.flag
            return error_response(outcome, grpc=call.request.is_grpc)
        if isinstance(outcome, Response):
            return outcome
        body = fixed_body(b"{}")
        body.on_cancel = lambda: self.cancelled.append(index)
        return Response(outcome, [(b"content-type", b"application/json")], body)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def retry_filter(metrics: Metrics | None = None, rand: float = 0.5, **config: Any) -> RetryFilter:
    return RetryFilter(
        RetryConfig(**config),
        metrics.filters if metrics is not None else None,
        sleep=Sleeps(),
        rand=lambda: rand,
        clock=FakeClock(),
    )


# --- retry ---------------------------------------------------------------------------


def test_retry_recovers_a_get_from_503() -> None:
    metrics = Metrics()
    flt = retry_filter(metrics)
    router = Router(503, 200)
    call = make_call()
    response = run(flt.handle(call, router))
    assert response.status == 200
    assert router.tries == 2 and call.tries == 2
    assert router.cancelled == [0]  # the discarded 503's body was dropped
    assert sample(metrics, "opus_retries_total", service="inventory") == 1
    assert call.flags == "-"
    # The caller learns the mesh retried, so its own client does not retry on top.
    assert dict(response.headers)[b"x-opus-attempt-count"] == b"2"


def test_no_attempt_count_header_without_a_retry() -> None:
    response = run(retry_filter().handle(make_call(), Router(200)))
    assert b"x-opus-attempt-count" not in dict(response.headers)


def test_retries_exhausted_flag_urx_and_return_last_response() -> None:
    flt = retry_filter(max_retries=2)
    router = Router(503, 502, 504)
    call = make_call()
    response = run(flt.handle(call, router))
    assert response.status == 504
    assert router.tries == 3
    assert call.flags == "URX"


def test_non_idempotent_is_not_retried_unless_marked() -> None:
    router = Router(503, 200)
    response = run(retry_filter().handle(make_call(b"POST"), router))
    assert response.status == 503 and router.tries == 1

    router = Router(503, 200)
    call = make_call(b"POST", [(b"x-opus-retryable", b"true"), (b"x-keep", b"1")])
    response = run(retry_filter().handle(call, router))
    assert response.status == 200 and router.tries == 2
    assert all(b"x-opus-retryable" not in dict(sent) for sent in router.sent)  # stripped
    assert all(dict(sent)[b"x-keep"] == b"1" for sent in router.sent)

    router = Router(503, 200)
    call = make_call(b"PATCH")
    call.retryable = True
    assert run(retry_filter().handle(call, router)).status == 200


def test_retry_safe_errors_are_retried_for_post_but_reset_is_not() -> None:
    for error in (UpstreamConnectError("refused"), StreamRefused("refused")):
        router = Router(error, 200)
        response = run(retry_filter().handle(make_call(b"POST", body=b"pay"), router))
        assert response.status == 200, error
        assert router.bodies == [b"pay", b"pay"]

    router = Router(UpstreamReset("reset"), 200)
    call = make_call(b"POST")
    response = run(retry_filter().handle(call, router))
    assert response.status == 502 and router.tries == 1
    assert call.flags == "UC"

    router = Router(UpstreamReset("reset"), 200)
    assert run(retry_filter().handle(make_call(b"GET"), router)).status == 200


def test_other_mesh_errors_and_unlisted_statuses_are_not_retried() -> None:
    router = Router(NoHealthyUpstream("none"), 200)
    assert run(retry_filter().handle(make_call(), router)).status == 503
    assert router.tries == 1
    router = Router(500, 200)
    assert run(retry_filter().handle(make_call(), router)).status == 500
    router = Router(500, 200)
    flt = retry_filter(retriable_status_codes=(500,))
    assert run(flt.handle(make_call(), router)).status == 200
    router = Router(503, 200)
    flt = retry_filter(retry_on=("connect-failure",))
    assert run(flt.handle(make_call(), router)).status == 503


def test_grpc_unavailable_in_trailers_only_reply_is_retried() -> None:
    unavailable = Response(200, [*GRPC, (b"grpc-status", b"14")], fixed_body())
    router = Router(unavailable, 200)
    call = make_call(b"POST", [*GRPC, (b"x-opus-retryable", b"true")])
    assert run(retry_filter().handle(call, router)).status == 200
    assert router.tries == 2
    # Another gRPC status is an application answer, not a mesh failure.
    not_found = Response(200, [*GRPC, (b"grpc-status", b"5")], fixed_body())
    router = Router(not_found, 200)
    call = make_call(b"POST", [*GRPC, (b"x-opus-retryable", b"true")])
    assert run(retry_filter().handle(call, router)).headers[-1] == (b"grpc-status", b"5")


def test_backoff_grows_exponentially_is_jittered_and_capped() -> None:
    low = retry_filter(rand=0.0, retry_delay=0.1, max_delay=0.3)
    high = retry_filter(rand=0.999, retry_delay=0.1, max_delay=0.3)
    ceilings = [0.1, 0.2, 0.3, 0.3]
    for n, ceiling in enumerate(ceilings, start=1):
        assert low.backoff(n) == pytest.approx(ceiling / 2)
        assert ceiling / 2 < high.backoff(n) < ceiling
    # The delays slept between tries follow the same schedule.
    flt = retry_filter(rand=0.0, retry_delay=0.1, max_delay=0.3)
    run(flt.handle(make_call(), Router(503)))
    assert isinstance(flt.sleep, Sleeps)
    assert flt.sleep.delays == pytest.approx([0.05, 0.1, 0.15])


def test_retry_is_not_started_past_the_deadline() -> None:
    flt = retry_filter(rand=0.0, retry_delay=1.0)  # first backoff 0.5 s
    call = make_call()
    call.deadline = flt.clock() + 0.4
    router = Router(503, 200)
    assert run(flt.handle(call, router)).status == 503
    assert router.tries == 1


def test_streamed_body_over_64k_is_not_resent() -> None:
    async def scenario(size: int) -> tuple[Response, Router]:
        body = Body()
        body.feed(b"a" * size)
        asyncio.get_running_loop().call_soon(body.finish)  # the end arrives later
        router = Router(503, 200)
        return await retry_filter().handle(make_call(b"PUT", body=body), router), router

    response, router = asyncio.run(scenario(REPLAY_LIMIT + 1))
    assert response.status == 503 and router.tries == 1
    response, router = asyncio.run(scenario(10_000))
    assert response.status == 200 and router.bodies == [b"a" * 10_000] * 2


def test_buffered_body_over_64k_is_resent() -> None:
    data = b"b" * (3 * REPLAY_LIMIT)
    router = Router(503, 200)
    response = run(retry_filter().handle(make_call(b"PUT", body=data), router))
    assert response.status == 200
    assert router.bodies == [data, data]


def test_per_try_timeout_cancels_the_try_and_retries() -> None:
    cancelled = []

    async def hang(call: Call) -> Response:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(call.tries)
            raise
        raise AssertionError("unreachable")

    metrics = Metrics()
    flt = retry_filter(metrics, per_try_timeout=0.01)
    router = Router(hang, 200)
    call = make_call()
    response = run(flt.handle(call, router))
    assert response.status == 200
    assert cancelled == [1]
    assert sample(metrics, "opus_timeouts_total", service="inventory", kind="per_try") == 1


def test_retry_budget_stops_a_storm() -> None:
    """10 calls fail at once; min_retry_concurrency 3 (20% of 10 is 2): 3 retry, 7 don't."""
    metrics = Metrics()
    flt = retry_filter(metrics, budget_percent=20.0, min_retry_concurrency=3)
    gate = asyncio.Event()
    in_flight = 0
    peak = 0

    async def held_retry(call: Call) -> Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        return Response(200, [], fixed_body())

    async def scenario() -> list[Response]:
        tasks = [
            asyncio.create_task(flt.handle(make_call(), Router(503, held_retry))) for _ in range(10)
        ]
        for _ in range(100):  # let every call fail once and ask for its retry
            await asyncio.sleep(0)
        assert in_flight == 3 and flt.retries_in_flight == 3
        assert sum(t.done() for t in tasks) == 7
        gate.set()
        return list(await asyncio.gather(*tasks))

    responses = asyncio.run(scenario())
    assert sorted(r.status for r in responses) == [200] * 3 + [503] * 7
    assert peak == 3
    assert sample(metrics, "opus_retries_total", service="inventory") == 3
    assert sample(metrics, "opus_retry_budget_exhausted_total", service="inventory") == 7
    assert flt.active == 0 and flt.retries_in_flight == 0


def test_retry_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_delay"):
        RetryConfig(retry_delay=2.0, max_delay=1.0).validate()
    with pytest.raises(ValueError, match="budget_percent"):
        RetryConfig(budget_percent=120).validate()
    with pytest.raises(ConfigError, match="retry_on"):
        retry.factory.parse({"retry_on": ["5xx"]}, "filters.outbound[0].config")
    with pytest.raises(ConfigError, match="max_retrys"):
        retry.factory.parse({"max_retrys": 2}, "filters.outbound[0].config")
    parsed = retry.factory.parse({"max_retries": 1, "per_try_timeout": 2}, "k")
    assert parsed.max_retries == 1 and parsed.per_try_timeout == 2.0


# --- timeout -------------------------------------------------------------------------


class Capture:
    """A router that records the call's deadline and headers and answers 200."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.headers: dict[bytes, bytes] = {}

    async def __call__(self, call: Call) -> Response:
        self.deadline = call.deadline
        self.headers = dict(call.request.headers)
        return Response(200, [], fixed_body())


def test_timeout_sets_the_deadline_and_honours_a_shorter_incoming_one() -> None:
    clock = FakeClock(100.0)
    flt = TimeoutFilter(TimeoutConfig(timeout=2.0), clock=clock)
    capture = Capture()
    run(flt.handle(make_call(), capture))
    assert capture.deadline == pytest.approx(102.0)

    run(flt.handle(make_call(hdrs=[(b"x-opus-deadline-ms", b"500")]), capture))
    assert capture.deadline == pytest.approx(100.5)
    run(flt.handle(make_call(hdrs=[(b"x-opus-deadline-ms", b"9000")]), capture))
    assert capture.deadline == pytest.approx(102.0)  # never lengthened

    call = make_call(b"POST", [*GRPC, (b"grpc-timeout", b"250m")])
    run(flt.handle(call, capture))
    assert capture.deadline == pytest.approx(100.25)
    assert capture.headers[b"grpc-timeout"] == b"250m"

    call = make_call(b"POST", GRPC)  # gRPC without a deadline gets ours
    run(flt.handle(call, capture))
    assert capture.headers[b"grpc-timeout"] == b"2000m"

    call = make_call()
    call.deadline = 101.0  # an outer deadline still binds
    run(flt.handle(call, capture))
    assert capture.deadline == pytest.approx(101.0)


def test_grpc_timeout_format() -> None:
    assert format_grpc_timeout(0.7000000001) == b"700m"  # float noise is not another ms
    assert format_grpc_timeout(1.2341) == b"1235m"  # rounded up, never shortened to 0
    assert format_grpc_timeout(-1) == b"0m"
    assert format_grpc_timeout(200_000.0) == b"200000S"


def test_expired_incoming_deadline_answers_504_without_calling_upstream() -> None:
    router = Router(200)
    chain = compose([TimeoutFilter(TimeoutConfig(timeout=5.0))], router)
    call = make_call(hdrs=[(b"x-opus-deadline-ms", b"0")])
    response = run(chain(call))
    assert response.status == 504 and router.tries == 0
    assert call.flags == "UT"

    call = make_call(b"POST", [*GRPC, (b"x-opus-deadline-ms", b"0")])
    response = run(chain(call))
    assert response.status == 200
    assert dict(response.headers)[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED


def test_timeout_cancels_the_inner_call_and_answers_504() -> None:
    cancelled = []

    async def hang(call: Call) -> Response:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        raise AssertionError("unreachable")

    metrics = Metrics()
    flt = TimeoutFilter(TimeoutConfig(timeout=0.02), metrics.filters)
    flt.name = "timeout"
    call = make_call()
    response = run(compose([flt], hang)(call))
    assert response.status == 504
    assert cancelled == [True]
    assert call.flags == "UT" and call.local_reply_by == "timeout"
    assert sample(metrics, "opus_timeouts_total", service="inventory", kind="overall") == 1


def test_malformed_incoming_deadlines_are_ignored() -> None:
    clock = FakeClock(100.0)
    flt = TimeoutFilter(TimeoutConfig(timeout=2.0), clock=clock)
    capture = Capture()
    for hdrs in ([(b"x-opus-deadline-ms", b"-5")], [(b"grpc-timeout", b"1.5S")]):
        run(flt.handle(make_call(hdrs=hdrs), capture))
        assert capture.deadline == pytest.approx(102.0), hdrs


def test_timeout_config_is_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        TimeoutConfig(timeout=0).validate()
    with pytest.raises(ConfigError, match="timeout"):
        timeout.factory.parse({"timeout": "15s"}, "filters.outbound[0].config")


# --- rate_limit ----------------------------------------------------------------------


def test_token_bucket_allows_burst_then_rate_with_retry_after() -> None:
    clock = FakeClock()
    metrics = Metrics()
    flt = RateLimitFilter(RateLimitConfig(rate=5, burst=5), metrics.filters, clock)
    router = Router(200)
    statuses = [run(flt.handle(make_call(), router)).status for _ in range(5)]
    assert statuses == [200] * 5
    call = make_call()
    limited = run(flt.handle(call, router))
    assert limited.status == 429
    assert dict(limited.headers)[b"retry-after"] == b"1"  # 0.2 s to the next token, rounded up
    assert json.loads(limited.body.read_nowait() or b"")["status"] == 429
    assert call.flags == "RL" and call.local_reply_by == ""  # set by the chain, not here
    clock.now += 0.2
    assert run(flt.handle(make_call(), router)).status == 200
    assert run(flt.handle(make_call(), router)).status == 429
    clock.now += 10  # refills only up to the burst
    assert [run(flt.handle(make_call(), router)).status for _ in range(6)] == [200] * 5 + [429]
    assert router.tries == 11
    assert sample(metrics, "opus_rate_limited_total", service="inventory") == 3


def test_retry_after_counts_whole_seconds_to_the_next_token() -> None:
    clock = FakeClock()
    flt = RateLimitFilter(RateLimitConfig(rate=0.1), None, clock)  # burst defaults to 1
    assert run(flt.handle(make_call(), Router(200))).status == 200
    assert dict(run(flt.handle(make_call(), Router(200))).headers)[b"retry-after"] == b"10"
    clock.now += 3.5
    assert dict(run(flt.handle(make_call(), Router(200))).headers)[b"retry-after"] == b"7"


def test_rate_limit_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="rate"):
        rate_limit.factory.parse({}, "filters.outbound[0].config")
    with pytest.raises(ValueError, match="rate"):
        RateLimitConfig(rate=0).validate()
    with pytest.raises(ValueError, match="burst"):
        RateLimitConfig(rate=1, burst=0).validate()


# --- circuit_breaker -----------------------------------------------------------------


def breaker(
    clock: FakeClock, metrics: Metrics | None = None, **config: Any
) -> CircuitBreakerFilter:
    filter_metrics = metrics.filters if metrics is not None else None
    return CircuitBreakerFilter(CircuitBreakerConfig(**config), filter_metrics, clock)


def state(flt: CircuitBreakerFilter) -> State:
    return flt.breaker.state  # read through a call so mypy does not narrow it between steps


def test_breaker_opens_after_consecutive_failures_then_half_opens_and_closes() -> None:
    clock = FakeClock()
    metrics = Metrics()
    flt = breaker(clock, metrics, consecutive_failures=3, open_duration=10.0)
    failing = Router(500)
    for _ in range(2):
        assert run(flt.handle(make_call(), failing)).status == 500
    assert run(flt.handle(make_call(), Router(200))).status == 200  # a success resets
    for _ in range(3):
        assert run(flt.handle(make_call(), failing)).status == 500
    assert state(flt) is State.OPEN
    call = make_call()
    response = run(flt.handle(call, failing))
    assert response.status == 503
    assert dict(response.headers)[b"x-opus-circuit"] == b"open"
    assert call.flags == "CO"
    assert failing.tries == 5  # the open circuit did not call upstream
    assert (
        sample(
            metrics, "opus_circuit_open_total", service="inventory", reason="consecutive_failures"
        )
        == 1
    )

    clock.now += 9.9
    assert run(flt.handle(make_call(), failing)).status == 503
    clock.now += 0.1
    healthy = Router(200)
    assert run(flt.handle(make_call(), healthy)).status == 200  # the probe
    assert state(flt) is State.CLOSED
    assert run(flt.handle(make_call(), healthy)).status == 200
    assert healthy.tries == 2


def test_failed_probe_reopens_and_only_one_probe_goes_at_a_time() -> None:
    clock = FakeClock()
    metrics = Metrics()
    flt = breaker(clock, metrics, consecutive_failures=1, open_duration=5.0)
    run(flt.handle(make_call(), Router(UpstreamConnectError("refused"))))
    assert state(flt) is State.OPEN
    clock.now += 5.0
    gate = asyncio.Event()

    async def slow_failure(call: Call) -> Response:
        await gate.wait()
        return Response(503, [], fixed_body())

    async def scenario() -> tuple[Response, Response]:
        probe = asyncio.create_task(flt.handle(make_call(), Router(slow_failure)))
        await asyncio.sleep(0)
        assert state(flt) is State.HALF_OPEN
        other = await flt.handle(make_call(), Router(200))  # refused while the probe runs
        gate.set()
        return await probe, other

    probe, other = asyncio.run(scenario())
    assert probe.status == 503 and other.status == 503
    assert dict(other.headers)[b"x-opus-circuit"] == b"open"
    assert state(flt) is State.OPEN
    assert (
        sample(metrics, "opus_circuit_open_total", service="inventory", reason="probe_failed") == 1
    )
    clock.now += 4.9
    assert dict(run(flt.handle(make_call(), Router(200))).headers)[b"x-opus-circuit"] == b"open"


def test_filter_refusals_do_not_count_as_upstream_failures() -> None:
    clock = FakeClock()
    flt = breaker(clock, consecutive_failures=1)

    async def limited(call: Call) -> Response:
        call.record_error(rate_limit.RateLimited("slow down", status=429))
        return Response(429, [], fixed_body())

    run(flt.handle(make_call(), limited))
    assert state(flt) is State.CLOSED


def test_max_requests_queues_up_to_max_pending_then_rejects() -> None:
    clock = FakeClock()
    flt = breaker(clock, max_requests=1, max_pending=1, pending_timeout=5.0)
    gate = asyncio.Event()

    async def held(call: Call) -> Response:
        await gate.wait()
        return Response(200, [], fixed_body())

    async def scenario() -> tuple[list[Response], Call]:
        first = asyncio.create_task(flt.handle(make_call(), Router(held)))
        second = asyncio.create_task(flt.handle(make_call(), Router(held)))
        await asyncio.sleep(0)
        assert flt.active == 1 and len(flt.waiters) == 1
        third_call = make_call()
        third = await flt.handle(third_call, Router(200))
        gate.set()
        return [await first, await second, third], third_call

    (first, second, third), third_call = asyncio.run(scenario())
    assert first.status == 200 and second.status == 200
    assert third.status == 503
    assert dict(third.headers)[b"x-opus-overloaded"] == b"true"
    assert third_call.flags == "UO"
    assert flt.active == 0 and not flt.waiters


def test_pending_call_gives_up_after_pending_timeout() -> None:
    flt = breaker(FakeClock(), max_requests=1, max_pending=4, pending_timeout=0.01)
    gate = asyncio.Event()

    async def held(call: Call) -> Response:
        await gate.wait()
        return Response(200, [], fixed_body())

    async def scenario() -> Response:
        first = asyncio.create_task(flt.handle(make_call(), Router(held)))
        await asyncio.sleep(0)
        waited = await flt.handle(make_call(), Router(200))
        gate.set()
        assert (await first).status == 200
        return waited

    response = asyncio.run(scenario())
    assert response.status == 503 and dict(response.headers)[b"x-opus-overloaded"] == b"true"
    assert flt.active == 0 and not flt.waiters


def test_breaker_config_is_checked() -> None:
    with pytest.raises(ValueError, match="consecutive_failures"):
        CircuitBreakerConfig(consecutive_failures=0).validate()
    with pytest.raises(ValueError, match="open_duration"):
        CircuitBreakerConfig(open_duration=0).validate()
    cfg = circuit_breaker.factory.parse({"max_requests": 2}, "k")
    assert cfg.max_requests == 2 and cfg.consecutive_failures == 5 and cfg.open_duration == 10.0


# --- headers -------------------------------------------------------------------------


def test_headers_add_set_remove_on_request_and_response() -> None:
    config = HeadersConfig(
        request_headers_to_add={"X-Added": "a"},
        request_headers_to_set={"X-Env": "prod"},
        request_headers_to_remove=("X-Secret",),
        response_headers_to_add={"x-served-by": "mesh"},
        response_headers_to_set={"Cache-Control": "no-store"},
        response_headers_to_remove=("server",),
    )
    flt = HeadersFilter(config)
    seen: list[Headers] = []

    async def upstream(call: Call) -> Response:
        seen.append(list(call.request.headers))
        return Response(
            200,
            [(b"server", b"aiohttp"), (b"cache-control", b"max-age=60"), (b"x-served-by", b"app")],
            fixed_body(),
        )

    call = make_call(
        hdrs=[
            (b"x-env", b"dev"),
            (b"x-env", b"dev2"),
            (b"x-secret", b"s"),
            (b"x-added", b"caller"),
        ]
    )
    response = run(flt.handle(call, upstream))
    assert seen[0] == [(b"x-added", b"caller"), (b"x-env", b"prod"), (b"x-added", b"a")]
    assert response.headers == [
        (b"x-served-by", b"app"),
        (b"cache-control", b"no-store"),
        (b"x-served-by", b"mesh"),
    ]


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\x00b", "a\rb"])
def test_headers_rejects_cr_lf_nul_in_values_naming_the_header(value: str) -> None:
    with pytest.raises(ValueError, match="X-Bad"):
        HeadersConfig(response_headers_to_set={"X-Bad": value}).validate()


def test_headers_config_errors_stop_load_and_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "filters:\n  outbound:\n    - name: headers\n      config:\n"
        '        request_headers_to_add: {x-ok: "1", x-evil: "a\\r\\nb"}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.key == "filters.outbound[0].config (headers)"
    assert "x-evil" in str(info.value)
    with pytest.raises(ValueError, match="not a valid header name"):
        HeadersConfig(request_headers_to_remove=("bad name",)).validate()
    with pytest.raises(ValueError, match="twice"):
        HeadersConfig(request_headers_to_set={"X-A": "1", "x-a": "2"}).validate()
    assert headers.factory.parse({}, "k") == HeadersConfig()
