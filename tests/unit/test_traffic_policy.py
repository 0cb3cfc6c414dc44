"""Per-route policy: the rule's timeout, retry and header rewrites run as the built-in
filters (their own checks name the rule's key), its filters replace the service's, and
the retry policy's gRPC statuses; fault injection's shares over 10,000 calls, its
header condition, and its aborts over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from filters.retry import RetryConfig, RetryFilter
from filters.timeout import TimeoutFilter
from sidecar.call import Call
from sidecar.chain import FilterContext, build_filters
from sidecar.config import ConfigError, FaultAbort, FaultConfig, FaultDelay, FilterSpec
from sidecar.messages import Response, fixed_body
from sidecar.traffic.fault import FaultFilter
from tests.unit.chain_helpers import make_call, read_response
from tests.unit.traffic_helpers import config, in_loop, outbound, request


def header(response: Response, name: bytes) -> bytes | None:
    return next((v for n, v in response.headers if n == name), None)


POLICY = """
services:
  inventory:
    route_rules:
      - name: slow-path
        match: {path: {prefix: /slow}}
        timeout: 2.5
        retry: {attempts: 4, per_try_timeout: 0.5, retry_on: [unavailable, internal]}
        headers: {request_headers_to_set: {x-route: slow}}
        filters: [{name: rate_limit, config: {rate: 5, burst: 5}}]
"""


def test_the_rules_policy_becomes_the_built_in_filters(tmp_path: Path) -> None:
    cfg = config(tmp_path, POLICY)
    rule = cfg.services["inventory"].route_rules[0]
    specs = dict(rule.policy_filters())
    assert specs["timeout"] == FilterSpec("timeout", {"timeout": 2.5})
    assert specs["retry"].config["max_retries"] == 4
    assert specs["retry"].config["per_try_timeout"] == 0.5
    assert specs["headers"].config == {"request_headers_to_set": {"x-route": "slow"}}
    ctx = FilterContext("outbound", "payment")
    built = build_filters(tuple(spec for _, spec in rule.policy_filters()), ctx, "k")
    assert [type(f) for f in built[:2]] == [TimeoutFilter, RetryFilter]


def test_the_rules_chain_holds_its_steps_in_order(tmp_path: Path) -> None:
    handler, _ = outbound(tmp_path, POLICY)
    in_loop(lambda: handler._resolve_by_rules(request(b"/v1/invoke/inventory/slow")))
    assert [f.name for f in handler.filters] == ["timeout", "retry", "headers", "rate_limit"]


@pytest.mark.parametrize(
    ("rule", "key", "words"),
    [
        ("{name: r, timeout: 0}", "route_rules[0].timeout", "must be a number > 0"),
        ("{name: r, retry: {attempts: -1}}", "route_rules[0].retry.attempts", ">= 0"),
        (
            "{name: r, retry: {per_try_timeout: 0}}",
            "route_rules[0].retry.per_try_timeout",
            "> 0",
        ),
        ("{name: r, retry: {retry_on: [nope]}}", "route_rules[0].retry.retry_on[0]", "one of"),
        (
            "{name: r, headers: {request_headers_to_set: {'a b': x}}}",
            "route_rules[0].headers",
            "not a valid header name",
        ),
        ("{name: r, filters: [{name: nope}]}", "route_rules[0].filters[0].name", "unknown"),
        ("{name: r, fault: {}}", "route_rules[0].fault", "delay, abort or both"),
        (
            "{name: r, fault: {delay: {fixed: 0.1, percent: 101}}}",
            "route_rules[0].fault.delay.percent",
            "0..100",
        ),
        ("{name: r, fault: {abort: {percent: 5}}}", "route_rules[0].fault.abort", "http_status"),
        (
            "{name: r, fault: {abort: {http_status: 99}}}",
            "route_rules[0].fault.abort.http_status",
            "200..599",
        ),
        (
            "{name: r, fault: {abort: {grpc_status: 0}}}",
            "route_rules[0].fault.abort.grpc_status",
            "1..16",
        ),
        (
            "{name: r, fault: {header: 'a b', abort: {http_status: 500}}}",
            "route_rules[0].fault.header",
            "not a valid header name",
        ),
        (
            "{name: r, mirror: {service: shadow, percent: -1}}",
            "route_rules[0].mirror.percent",
            "0..100",
        ),
        (
            "{name: r, mirror: {service: shadow, max_in_flight: 0}}",
            "route_rules[0].mirror.max_in_flight",
            ">= 1",
        ),
        (
            "{name: r, mirror: {service: shadow, max_body_bytes: 10, max_buffered_bytes: 5}}",
            "route_rules[0].mirror.max_buffered_bytes",
            ">= max_body_bytes",
        ),
        (
            "{name: r, mirror: {service: shadow, subset: blue}}",
            "route_rules[0].mirror.subset",
            "not a subset of 'shadow'",
        ),
    ],
)
def test_bad_policy_is_refused_at_load_naming_the_key(
    tmp_path: Path, rule: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, f"route_rules: [{rule}]")
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("status", "condition"),
    [(b"14", "unavailable"), (b"13", "internal"), (b"8", "resource-exhausted"), (b"0", None)],
)
def test_retry_on_names_grpc_statuses(status: bytes, condition: str | None) -> None:
    grpc = make_call(headers=[(b"content-type", b"application/grpc")])
    flt = RetryFilter(RetryConfig(retry_on=("unavailable", "internal", "resource-exhausted")))
    reply = Response(200, [(b"grpc-status", status)], fixed_body())
    assert flt.retry_condition(grpc, reply) == condition
    only_unavailable = RetryFilter(RetryConfig(retry_on=("unavailable",)))
    assert only_unavailable.retry_condition(grpc, reply) == (
        "unavailable" if status == b"14" else None
    )


# -- fault injection --


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, call: Call) -> Response:
        self.calls += 1
        return Response(200, [], fixed_body(b"ok"))


def fault_run(
    config: FaultConfig, calls: int, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[list[Response], list[float], Upstream]:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    flt = FaultFilter(config, rand=random.Random(18).random, sleep=sleep)
    upstream = Upstream()

    async def main() -> list[Response]:
        return [await flt.handle(make_call(headers=headers), upstream) for _ in range(calls)]

    return asyncio.run(main()), delays, upstream


def test_delay_and_abort_shares_over_10000_calls_within_2_points() -> None:
    fault = FaultConfig(
        delay=FaultDelay(fixed=0.2, percent=10), abort=FaultAbort(http_status=503, percent=25)
    )
    responses, delays, upstream = fault_run(fault, 10_000)
    assert abs(len(delays) / 100 - 10) <= 2
    assert set(delays) == {0.2}
    aborted = sum(1 for r in responses if r.status == 503)
    assert abs(aborted / 100 - 25) <= 2
    assert upstream.calls == 10_000 - aborted


def test_a_fault_with_a_header_condition_spares_calls_without_it() -> None:
    fault = FaultConfig(abort=FaultAbort(http_status=500), header="x-chaos")
    responses, _, _ = fault_run(fault, 10)
    assert {r.status for r in responses} == {200}
    responses, _, _ = fault_run(fault, 10, [(b"x-chaos", b"on")])
    assert {r.status for r in responses} == {500}


def test_an_abort_carries_its_http_or_grpc_status() -> None:
    both = FaultConfig(abort=FaultAbort(http_status=429, grpc_status=8))
    (http,), _, _ = fault_run(both, 1)
    assert http.status == 429
    assert header(http, b"x-opus-error") == b"FI"
    assert b"fault injected" in asyncio.run(read_response(http))
    grpc_headers = [(b"content-type", b"application/grpc")]
    (grpc,), _, _ = fault_run(both, 1, grpc_headers)
    assert (grpc.status, header(grpc, b"grpc-status")) == (200, b"8")
    # One status given: the other side gets what it stands for.
    (mapped,), _, _ = fault_run(FaultConfig(abort=FaultAbort(grpc_status=14)), 1)
    assert mapped.status == 503
    (mapped,), _, _ = fault_run(FaultConfig(abort=FaultAbort(http_status=504)), 1, grpc_headers)
    assert header(mapped, b"grpc-status") == b"14"
