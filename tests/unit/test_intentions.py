"""Consul intentions deciding inbound calls (sidecar/intentions.py), driven with an
in-memory agent: the verdict cache, one ask per caller at a time, failing closed, the
last verdict kept through an agent outage, the 403 and its metric, the config's checks
and where the step sits in the inbound chain."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest
import yaml

from sidecar.accesslog import AccessLog
from sidecar.authz import AuthorizationStep
from sidecar.call import Call
from sidecar.cluster import Cluster
from sidecar.config import ConfigError, SidecarConfig, load_config_bytes
from sidecar.config.authz import IntentionsConfig
from sidecar.discovery.base import Endpoint
from sidecar.inbound import TlsInboundHandler
from sidecar.intentions import RULE, Intentions, IntentionsStep
from sidecar.lb import RoundRobin
from sidecar.messages import Request, Response, fixed_body
from sidecar.metrics import Metrics
from sidecar.tls.inbound import InboundTls
from sidecar.tracing import Tracing
from sidecar.upstream.h1pool import H1Pool
from sidecar.upstream.pool import PoolLimits

TD = "11111111-2222-3333-4444-555555555555.consul"
PAYMENT = f"spiffe://{TD}/ns/default/dc/dc1/svc/payment"
BILLING = f"spiffe://{TD}/ns/default/dc/dc1/svc/billing"


class Agent:
    """/v1/agent/connect/authorize's answers, by the caller's URI; counts the asks."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.asked: list[tuple[str, str]] = []
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None  # set: the answer is held until it is

    async def __call__(self, uri: str, serial: str) -> tuple[bool, str]:
        self.asked.append((uri, serial))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        allowed = uri in self.allowed
        return allowed, f"Matched L4 intention ({'allow' if allowed else 'deny'})"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def intentions(agent: Agent, clock: Clock, **cfg: Any) -> tuple[Intentions, Metrics]:
    metrics = Metrics()
    settings = IntentionsConfig(source="consul", **cfg)
    return Intentions(agent, "inventory", settings, metrics.authz_intentions_errors, clock), metrics


def test_a_verdict_is_reused_for_its_ttl_then_asked_again() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    found, _ = intentions(agent, clock, cache_ttl=10)

    async def run() -> None:
        assert (await found.decide(PAYMENT, "0a:01"))[0] is True
        assert (await found.decide(BILLING, "0a:02"))[0] is False
        clock.now += 9.9
        assert (await found.decide(PAYMENT, "0a:01"))[0] is True
        assert len(agent.asked) == 2  # both from the cache
        agent.allowed = set()  # the operator denies payment
        clock.now += 0.2
        allowed, reason = await found.decide(PAYMENT, "0a:01")
        assert allowed is False and "deny" in reason

    asyncio.run(run())
    assert agent.asked == [(PAYMENT, "0a:01"), (BILLING, "0a:02"), (PAYMENT, "0a:01")]


def test_concurrent_calls_of_one_caller_share_one_ask_and_a_cancelled_one_ends_none() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    found, _ = intentions(agent, clock)

    async def run() -> None:
        agent.gate = asyncio.Event()
        calls = [asyncio.ensure_future(found.decide(PAYMENT, "")) for _ in range(20)]
        await asyncio.sleep(0)
        calls[0].cancel()  # the first asker goes away mid-ask
        await asyncio.sleep(0)
        agent.gate.set()
        results = await asyncio.gather(*calls[1:])
        assert all(allowed for allowed, _ in results)

    asyncio.run(run())
    assert len(agent.asked) == 1


def test_no_certificate_is_denied_without_asking() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    found, _ = intentions(agent, clock)
    allowed, reason = asyncio.run(found.decide("", ""))
    assert allowed is False and "no certificate" in reason and agent.asked == []


def test_an_agent_error_fails_closed_but_keeps_a_recent_verdict() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    found, metrics = intentions(agent, clock, cache_ttl=10, stale_for=60)

    async def run() -> None:
        assert (await found.decide(PAYMENT, ""))[0] is True
        agent.error = ConnectionRefusedError("connection refused")
        clock.now += 30  # past the ttl: asked again, the agent is down
        assert (await found.decide(PAYMENT, ""))[0] is True  # the last verdict, 30 s old
        allowed, reason = await found.decide(BILLING, "")  # never asked before: denied
        assert allowed is False and "unavailable: connection refused" in reason
        clock.now += 41  # 71 s since the verdict: past ttl + stale_for
        assert (await found.decide(PAYMENT, ""))[0] is False
        agent.error = None  # the agent is back: asked again, at once
        assert (await found.decide(PAYMENT, ""))[0] is True

    asyncio.run(run())
    errors = metrics.registry.get_sample_value("opus_authz_intentions_errors_total")
    assert errors == 3 and found.failures == 3


def test_an_agent_timeout_is_an_error_not_a_hang() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    agent.error = TimeoutError()
    found, _ = intentions(agent, clock)
    allowed, reason = asyncio.run(found.decide(PAYMENT, ""))
    assert allowed is False and "TimeoutError" in reason


def test_the_cache_is_bounded_oldest_out() -> None:
    agent, clock = Agent(set()), Clock()
    found, _ = intentions(agent, clock, max_cached=3)

    async def run() -> None:
        for i in range(5):
            await found.decide(f"spiffe://{TD}/ns/default/dc/dc1/svc/s{i}", "")
        await found.decide(f"spiffe://{TD}/ns/default/dc/dc1/svc/s4", "")  # cached

    asyncio.run(run())
    assert len(found._verdicts) == 3 and len(agent.asked) == 5


class _App:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, call: Call) -> Response:
        self.calls += 1
        return Response(200, [], fixed_body(b"ok"))


def _call(headers: list[tuple[bytes, bytes]] | None = None) -> Call:
    req = Request(
        b"POST", b"/items", b"inventory", list(headers or []), fixed_body(), peer="127.0.0.1:4000"
    )
    return Call(req, "inbound", "inventory", b"inventory", req.path, 0)


def test_the_step_answers_403_naming_consul_and_counts_it() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    found, metrics = intentions(agent, clock)
    app = _App()
    denied = IntentionsStep(found, lambda _: (BILLING, "0b"), app, metrics.authz_denied)
    response = asyncio.run(denied(_call()))
    body = json.loads(response.body.read_nowait() or b"")
    assert response.status == 403 and app.calls == 0
    assert "Consul intentions" in body["error"] and BILLING in body["error"]
    assert metrics.registry.get_sample_value("opus_authz_denied_total", {"rule": RULE}) == 1
    grpc = [(b"content-type", b"application/grpc")]
    reply = asyncio.run(denied(_call(grpc)))
    assert dict(reply.headers)[b"grpc-status"] == b"7"  # PERMISSION_DENIED
    allowed = IntentionsStep(found, lambda _: (PAYMENT, "0a"), app, metrics.authz_denied)
    assert asyncio.run(allowed(_call())).status == 200 and app.calls == 1


def config(
    intentions_cfg: dict[str, Any], rules: list[dict[str, Any]] | None = None, **extra: Any
) -> SidecarConfig:
    raw: dict[str, Any] = {
        "tls": {
            "mode": "strict",
            "trust_domain": TD,
            "source": "consul",
            "consul": {"address": "127.0.0.1:8500"},
        },
        "authorization": {"intentions": intentions_cfg, "rules": rules or []},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config_bytes(yaml.safe_dump(raw).encode(), None, {})


@pytest.mark.parametrize(
    ("cfg", "extra", "key"),
    [
        ({"source": "vault"}, {}, "authorization.intentions.source"),
        ({"source": "consul", "cache_ttl": -1}, {}, "authorization.intentions.cache_ttl"),
        ({"source": "consul", "timeout": 0}, {}, "authorization.intentions.timeout"),
        ({"source": "consul", "max_cached": 0}, {}, "authorization.intentions.max_cached"),
        ({"source": "consul"}, {"tls": {"mode": "disable"}}, "authorization.intentions.source"),
    ],
)
def test_config_errors_name_the_key(cfg: dict[str, Any], extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(cfg, **extra)
    assert info.value.key == key, info.value


def test_intentions_follow_the_local_rules_in_the_chain() -> None:
    asyncio.run(_chain())


async def _chain() -> None:
    agent, clock = Agent({PAYMENT}), Clock()
    found, _ = intentions(agent, clock)
    tls = InboundTls("strict", cast("Any", None), 5.0)
    tls.verified("127.0.0.1:4000", PAYMENT, None, "0a:01")
    rules = [{"name": "no-billing", "action": "DENY", "from": [{"identities": [BILLING]}]}]
    cfg = config({"source": "consul"}, rules=rules)
    handler = _tls_handler(cfg, tls, found)
    policy = handler.chain
    assert isinstance(policy, AuthorizationStep) and isinstance(policy.next, IntentionsStep)
    assert policy.next.next is handler.filter_chain and handler._callback_cluster is None
    assert policy.next.peer(_call().request) == (PAYMENT, "0a:01")
    # Intentions alone: their step first; without them, the chain as before.
    alone = _tls_handler(config({"source": "consul"}), tls, found).chain
    assert isinstance(alone, IntentionsStep)
    assert not isinstance(_tls_handler(config({}), tls, None).chain, IntentionsStep)


def _tls_handler(cfg: SidecarConfig, tls: InboundTls, found: Intentions | None) -> Any:
    metrics = Metrics()

    async def connect(*_: Any) -> Any:
        raise ConnectionRefusedError

    cluster = Cluster("app", H1Pool("app", PoolLimits(), metrics, connect=connect), RoundRobin())
    cluster.update((Endpoint("127.0.0.1", 8080, instance_id="app"),))
    return TlsInboundHandler(
        cfg, cluster, metrics, AccessLog(""), Tracing(None), tls, intentions=found
    )
