"""The inbound authorization policy (sidecar/authz.py): Istio's semantics (DENY before
ALLOW, default deny once an ALLOW rule exists), identities exact and by prefix, services
mapped to identities, plaintext callers, methods, paths, gRPC methods, headers; the step's
403 / PERMISSION_DENIED reply; config errors naming the rule's key; and no step, so no
cost per call, without rules."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import yaml

from sidecar.accesslog import AccessLog
from sidecar.authz import (
    NO_ALLOW_RULE,
    AuthorizationStep,
    Policy,
    compile_policy,
    normalize_path,
)
from sidecar.call import Call
from sidecar.callhandler import RouterStep
from sidecar.cluster import Cluster
from sidecar.config import ConfigError, SidecarConfig, config_to_dict, load_config_bytes
from sidecar.discovery.base import Endpoint
from sidecar.inbound import InboundHandler
from sidecar.lb import RoundRobin
from sidecar.messages import Headers, Request, Response, fixed_body
from sidecar.metrics import Metrics
from sidecar.tracing import Tracing
from sidecar.upstream.h1pool import H1Pool
from sidecar.upstream.pool import PoolLimits

TD = "mesh.test"
PAYMENT = f"spiffe://{TD}/svc/payment"
SHOP_CART = f"spiffe://{TD}/ns/shop/sa/cart"
GRPC = [(b"content-type", b"application/grpc")]


def config(rules: list[dict[str, Any]], **extra: Any) -> SidecarConfig:
    raw = {"tls": {"trust_domain": TD}, "authorization": {"rules": rules}, **extra}
    return load_config_bytes(yaml.safe_dump(raw).encode(), None, {})


def policy(rules: list[dict[str, Any]], **extra: Any) -> Policy:
    compiled = compile_policy(config(rules, **extra))
    assert compiled is not None
    return compiled


def request(
    path: bytes = b"/items", method: bytes = b"GET", headers: Headers | None = None
) -> Request:
    return Request(method, path, b"127.0.0.1:4000", list(headers or []), fixed_body())


def error_at(rules: list[dict[str, Any]], **extra: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config(rules, **extra)
    return info.value


def test_deny_rules_win_over_allow_rules() -> None:
    p = policy(
        [
            {"name": "allow-all-shop", "from": [{"identities": [f"spiffe://{TD}/ns/shop/*"]}]},
            {"name": "no-cart", "action": "DENY", "from": [{"identities": [SHOP_CART]}]},
        ]
    )
    assert p.decide(request(), SHOP_CART) == "no-cart"
    assert p.decide(request(), f"spiffe://{TD}/ns/shop/sa/web") is None


def test_default_deny_once_an_allow_rule_exists() -> None:
    p = policy([{"name": "payment", "from": [{"services": ["payment"]}]}])
    assert p.decide(request(), PAYMENT) is None
    assert p.decide(request(), f"spiffe://{TD}/svc/billing") == NO_ALLOW_RULE
    assert p.decide(request(), "") == NO_ALLOW_RULE


def test_only_deny_rules_allow_the_rest() -> None:
    p = policy([{"name": "no-billing", "action": "DENY", "from": [{"services": ["billing"]}]}])
    assert p.decide(request(), f"spiffe://{TD}/svc/billing") == "no-billing"
    assert p.decide(request(), PAYMENT) is None
    assert p.decide(request(), "") is None


def test_identity_prefix_is_a_prefix_not_a_pattern() -> None:
    p = policy([{"name": "shop", "from": [{"identities": [f"spiffe://{TD}/ns/shop/*"]}]}])
    assert p.decide(request(), SHOP_CART) is None
    assert p.decide(request(), f"spiffe://{TD}/ns/shopping/sa/x") == NO_ALLOW_RULE
    assert p.decide(request(), "spiffe://other.td/ns/shop/sa/cart") == NO_ALLOW_RULE


def test_a_service_is_its_configured_identity_when_it_has_one() -> None:
    custom = f"spiffe://{TD}/ns/prod/sa/payment"
    p = policy(
        [{"name": "payment", "from": [{"services": ["payment"]}]}],
        services={"payment": {"identity": custom}},
    )
    assert p.decide(request(), custom) is None
    assert p.decide(request(), PAYMENT) == NO_ALLOW_RULE


def test_unauthenticated_callers_are_named_explicitly() -> None:
    allow = policy([{"name": "plain", "from": [{"unauthenticated": True}]}])
    assert allow.decide(request(), "") is None
    assert allow.decide(request(), PAYMENT) == NO_ALLOW_RULE
    deny = policy([{"name": "no-plain", "action": "DENY", "from": [{"unauthenticated": True}]}])
    assert deny.decide(request(), "") == "no-plain"
    assert deny.decide(request(), PAYMENT) is None
    # A rule naming identities does not match a caller without one.
    ids = policy([{"name": "x", "action": "DENY", "from": [{"identities": ["spiffe://*"]}]}])
    assert ids.decide(request(), "") is None
    assert ids.decide(request(), PAYMENT) == "x"


def test_methods_and_paths_exact_and_prefix() -> None:
    p = policy(
        [
            {
                "name": "reads",
                "from": [{"services": ["payment"]}],
                "to": [{"methods": ["get", "HEAD"], "paths": ["/items", "/api/*"]}],
            }
        ]
    )
    assert p.decide(request(b"/items"), PAYMENT) is None
    assert p.decide(request(b"/items?id=3"), PAYMENT) is None  # the query is not the path
    assert p.decide(request(b"/api/v1/x", b"HEAD"), PAYMENT) is None
    assert p.decide(request(b"/items/3"), PAYMENT) == NO_ALLOW_RULE
    assert p.decide(request(b"/items", b"POST"), PAYMENT) == NO_ALLOW_RULE
    assert p.decide(request(b"/apix"), PAYMENT) == NO_ALLOW_RULE


@pytest.mark.parametrize(
    "path",
    [
        b"/admin/users",
        b"/public/../admin/users",
        b"/%61dmin/users",
        b"/%2e%2e/admin/users",
        b"//admin//users",
        b"/./admin/users?x=/public",
    ],
)
def test_paths_are_matched_normalized_so_a_deny_cannot_be_walked_around(path: bytes) -> None:
    p = policy([{"name": "no-admin", "action": "DENY", "to": [{"paths": ["/admin/*"]}]}])
    assert p.decide(request(path), PAYMENT) == "no-admin"


def test_normalized_paths() -> None:
    assert normalize_path(b"/a/./b/../c/") == b"/a/c/"
    assert normalize_path(b"/../..") == b"/"
    assert normalize_path(b"/a%2Fb/%7euser") == b"/a%2Fb/~user"  # an encoded '/' stays
    assert normalize_path(b"/a%2fb") == b"/a%2Fb"


def test_any_to_entry_and_any_from_entry_match() -> None:
    p = policy(
        [
            {
                "name": "r",
                "from": [{"services": ["payment"]}, {"unauthenticated": True}],
                "to": [{"paths": ["/a"]}, {"methods": ["POST"]}],
            }
        ]
    )
    assert p.decide(request(b"/a"), "") is None
    assert p.decide(request(b"/b", b"POST"), PAYMENT) is None
    assert p.decide(request(b"/b"), PAYMENT) == NO_ALLOW_RULE


def test_grpc_methods_match_grpc_calls_only() -> None:
    p = policy(
        [
            {
                "name": "reserve",
                "to": [{"grpc": ["shop.Inventory/Reserve", "shop.Catalog/*"]}],
            }
        ]
    )
    assert p.decide(request(b"/shop.Inventory/Reserve", b"POST", GRPC), PAYMENT) is None
    assert p.decide(request(b"/shop.Catalog/List", b"POST", GRPC), PAYMENT) is None
    assert p.decide(request(b"/shop.Inventory/Drop", b"POST", GRPC), PAYMENT) == NO_ALLOW_RULE
    # Not a gRPC call: the same path over plain HTTP is not the gRPC method.
    assert p.decide(request(b"/shop.Inventory/Reserve", b"POST"), PAYMENT) == NO_ALLOW_RULE


def test_header_conditions_must_all_hold() -> None:
    p = policy(
        [
            {
                "name": "no-debug",
                "action": "DENY",
                "headers": [
                    {"name": "x-debug", "present": True},
                    {"name": "x-env", "exact": "prod"},
                ],
            }
        ]
    )
    both = [(b"x-debug", b"1"), (b"x-env", b"prod")]
    assert p.decide(request(headers=both), PAYMENT) == "no-debug"
    assert p.decide(request(headers=both[:1]), PAYMENT) is None
    assert p.decide(request(headers=[(b"x-debug", b"1"), (b"x-env", b"dev")]), "") is None


def test_from_is_spelt_from_in_the_config_and_its_dump() -> None:
    cfg = config([{"name": "a", "from": [{"unauthenticated": True}]}])
    assert cfg.authorization.rules[0].from_[0].unauthenticated
    dumped = config_to_dict(cfg)["authorization"]["rules"][0]
    assert "from" in dumped and "from_" not in dumped


def test_no_rules_no_policy() -> None:
    assert compile_policy(load_config_bytes(b"", None, {})) is None


@pytest.mark.parametrize(
    ("rules", "extra", "key", "words"),
    [
        ([{"name": "a b"}], {}, "authorization.rules[0].name", "letters"),
        ([{"name": "a"}, {"name": "a"}], {}, "authorization.rules[1].name", "already"),
        ([{"name": "a", "action": "allow"}], {}, "authorization.rules[0].action", "ALLOW"),
        ([{"name": "a", "from": [{}]}], {}, "authorization.rules[0].from[0]", "unauthenticated"),
        (
            [{"name": "a"}, {"name": "b", "from": [{"identities": ["payment"]}]}],
            {},
            "authorization.rules[1].from[0].identities[0]",
            "SPIFFE ID",
        ),
        (
            [{"name": "a", "from": [{"identities": ["spiffe://td/*/x"]}]}],
            {},
            "authorization.rules[0].from[0].identities[0]",
            "ending in '*'",
        ),
        (
            [{"name": "a", "from": [{"services": ["Pay_ment"]}]}],
            {},
            "authorization.rules[0].from[0].services[0]",
            "service name",
        ),
        (
            [{"name": "a", "from": [{"services": ["payment"]}]}],
            {"tls": {"trust_domain": ""}},
            "authorization.rules[0].from[0].services[0]",
            "tls.trust_domain",
        ),
        (
            [{"name": "a", "to": [{"methods": ["GE T"]}]}],
            {},
            "authorization.rules[0].to[0].methods[0]",
            "HTTP method",
        ),
        (
            [{"name": "a", "to": [{"paths": ["items"]}]}],
            {},
            "authorization.rules[0].to[0].paths[0]",
            "'/'",
        ),
        (
            [{"name": "a", "to": [{"grpc": ["shop.Inventory"]}]}],
            {},
            "authorization.rules[0].to[0].grpc[0]",
            "pkg.Service/Method",
        ),
        (
            [{"name": "a", "headers": [{"name": "x", "regex": "("}]}],
            {},
            "authorization.rules[0].headers[0].regex",
            "regular expression",
        ),
        ([{"name": "a", "form": []}], {}, "authorization.rules[0].form", "did you mean 'from'"),
    ],
)
def test_config_errors_name_the_rule_and_key(
    rules: list[dict[str, Any]], extra: dict[str, Any], key: str, words: str
) -> None:
    raw: dict[str, Any] = {"tls": {"trust_domain": TD}, "authorization": {"rules": rules}}
    raw.update(extra)
    with pytest.raises(ConfigError) as info:
        load_config_bytes(yaml.safe_dump(raw).encode(), None, {})
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)


class _App:
    """The rest of the chain: counts what reaches it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, call: Call) -> Response:
        self.calls += 1
        return Response(200, [], fixed_body(b"ok"))


def _step(rules: list[dict[str, Any]], identity: str) -> tuple[AuthorizationStep, _App, Metrics]:
    app, metrics = _App(), Metrics()
    step = AuthorizationStep(policy(rules), lambda _: identity, app, metrics.authz_denied)
    return step, app, metrics


def _call(req: Request) -> Call:
    return Call(req, "inbound", "inventory", b"inventory", req.path, 0)


def test_a_denied_http_call_gets_403_naming_the_rule_and_never_reaches_the_app() -> None:
    step, app, metrics = _step(
        [{"name": "no-billing", "action": "DENY", "from": [{"services": ["billing"]}]}],
        f"spiffe://{TD}/svc/billing",
    )
    call = _call(request())
    response = asyncio.run(step(call))
    assert response.status == 403 and app.calls == 0
    body = json.loads(response.body.read_nowait() or b"")
    assert "'no-billing'" in body["error"] and body["status"] == 403
    assert dict(response.headers)[b"x-opus-error"] == b"RBAC"
    assert call.flags == "RBAC" and call.local_reply_by == "authz"
    denied = metrics.registry.get_sample_value("opus_authz_denied_total", {"rule": "no-billing"})
    assert denied == 1


def test_a_denied_grpc_call_gets_permission_denied_trailers_only() -> None:
    step, app, metrics = _step([{"name": "only-payment", "from": [{"services": ["payment"]}]}], "")
    response = asyncio.run(step(_call(request(b"/shop.Inventory/Reserve", b"POST", GRPC))))
    headers = dict(response.headers)
    assert response.status == 200 and headers[b"grpc-status"] == b"7" and app.calls == 0
    assert b"no ALLOW rule" in headers[b"grpc-message"]
    denied = metrics.registry.get_sample_value("opus_authz_denied_total", {"rule": NO_ALLOW_RULE})
    assert denied == 1


def test_an_allowed_call_goes_on() -> None:
    step, app, _ = _step([{"name": "only-payment", "from": [{"services": ["payment"]}]}], PAYMENT)
    response = asyncio.run(step(_call(request())))
    assert response.status == 200 and app.calls == 1


def _handler(cfg: SidecarConfig, keep: InboundHandler | None = None) -> InboundHandler:
    metrics = Metrics()

    async def connect(*_: Any) -> Any:
        raise ConnectionRefusedError

    pool = H1Pool("app", PoolLimits(), metrics, connect=connect)
    cluster = Cluster("app", pool, RoundRobin())
    cluster.update((Endpoint("127.0.0.1", 8080, instance_id="app"),))
    return InboundHandler(cfg, cluster, metrics, AccessLog(""), Tracing(None), keep_chain_of=keep)


def test_no_rules_leave_the_chain_and_its_callback_path_as_they_were() -> None:
    asyncio.run(_no_rules())


async def _no_rules() -> None:
    handler = _handler(load_config_bytes(b"", None, {}))
    assert type(handler.chain) is RouterStep and handler._callback_cluster is not None


def test_rules_put_the_policy_first_and_a_reload_keeps_the_filters_only() -> None:
    asyncio.run(_rules_and_reload())


async def _rules_and_reload() -> None:
    filters = {"filters": {"inbound": [{"name": "headers", "config": {}}]}}
    first = _handler(config([{"name": "a", "from": [{"unauthenticated": True}]}], **filters))
    assert isinstance(first.chain, AuthorizationStep) and first._callback_cluster is None
    assert first.chain.next is first.filter_chain
    # The rules change, filters.inbound does not: new policy, the same filters.
    second = _handler(
        config([{"name": "b", "action": "DENY", "from": [{"unauthenticated": True}]}], **filters),
        keep=first,
    )
    assert isinstance(second.chain, AuthorizationStep)
    assert second.chain.next is first.filter_chain
    assert second.chain.policy.decide(request(), "") == "b"
    # Rules removed: back to the filters alone.
    third = _handler(load_config_bytes(yaml.safe_dump(filters).encode(), None, {}), keep=second)
    assert third.chain is first.filter_chain
