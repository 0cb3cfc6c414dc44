"""Route rules: matching (path, method, headers, query, gRPC), first match wins at each
level, the rule's name as the call's route, and the config checks that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError
from tests.unit.traffic_helpers import config, in_loop, outbound, request

GRPC = [(b"content-type", b"application/grpc")]


def route_of(tmp_path: Path, rules: str, req: object) -> str:
    handler, _ = outbound(tmp_path, rules)
    return in_loop(lambda: handler._resolve_by_rules(req))[4]  # type: ignore[arg-type]


SERVICE_RULES = """
services:
  inventory:
    route_rules:
      - {name: exact, match: {path: {exact: /items}}}
      - {name: prefix, match: {path: {prefix: /api/}}}
      - {name: regex, match: {path: {regex: '/users/[0-9]+'}}}
      - {name: writes, match: {methods: [DELETE, put]}}
      - {name: hdr-exact, match: {headers: [{name: X-User, exact: alice}]}}
      - {name: hdr-prefix, match: {headers: [{name: x-user, prefix: bo}]}}
      - {name: hdr-regex, match: {headers: [{name: x-user, regex: 'c[a-z]+'}]}}
      - {name: hdr-present, match: {headers: [{name: x-debug, present: true}]}}
      - name: hdr-absent
        match: {path: {prefix: /anon}, headers: [{name: authorization, absent: true}]}
      - {name: q-exact, match: {query: [{name: v, exact: '2'}]}}
      - {name: q-regex, match: {query: [{name: id, regex: '[a-f]+'}]}}
      - {name: q-present, match: {query: [{name: flag, present: true}]}}
      - {name: grpc-method, match: {grpc: {service: shop.Inventory, method: Get}}}
      - {name: grpc-service, match: {grpc: {service: shop.Inventory}}}
"""


@pytest.mark.parametrize(
    ("path", "headers", "method", "expected"),
    [
        (b"/v1/invoke/inventory/items", [], b"GET", "exact"),
        (b"/v1/invoke/inventory/items?x=1", [], b"GET", "exact"),  # the query is not the path
        (b"/v1/invoke/inventory/items/1", [], b"GET", "invoke"),
        (b"/v1/invoke/inventory/api/x", [], b"GET", "prefix"),
        (b"/v1/invoke/inventory/users/42", [], b"GET", "regex"),
        (b"/v1/invoke/inventory/users/42x", [], b"GET", "invoke"),  # the whole path
        (b"/v1/invoke/inventory/other", [], b"DELETE", "writes"),
        (b"/v1/invoke/inventory/other", [], b"PUT", "writes"),
        (b"/v1/invoke/inventory/other", [], b"POST", "invoke"),
        (b"/v1/invoke/inventory/o", [(b"x-user", b"alice")], b"GET", "hdr-exact"),
        (b"/v1/invoke/inventory/o", [(b"x-user", b"alicia")], b"GET", "invoke"),
        (b"/v1/invoke/inventory/o", [(b"x-user", b"bob")], b"GET", "hdr-prefix"),
        (b"/v1/invoke/inventory/o", [(b"x-user", b"carol")], b"GET", "hdr-regex"),
        (b"/v1/invoke/inventory/o", [(b"x-debug", b"")], b"GET", "hdr-present"),
        (b"/v1/invoke/inventory/anon", [], b"GET", "hdr-absent"),
        (b"/v1/invoke/inventory/anon", [(b"authorization", b"x")], b"GET", "invoke"),
        (b"/v1/invoke/inventory/o?a=1&v=2", [], b"GET", "q-exact"),
        (b"/v1/invoke/inventory/o?v=3", [], b"GET", "invoke"),
        (b"/v1/invoke/inventory/o?id=beef", [], b"GET", "q-regex"),
        (b"/v1/invoke/inventory/o?id=beefy", [], b"GET", "invoke"),
        (b"/v1/invoke/inventory/o?flag", [], b"GET", "q-present"),
        (b"/v1/invoke/inventory/shop.Inventory/Get", GRPC, b"POST", "grpc-method"),
        (b"/v1/invoke/inventory/shop.Inventory/List", GRPC, b"POST", "grpc-service"),
    ],
)
def test_each_kind_of_match(
    tmp_path: Path, path: bytes, headers: list[tuple[bytes, bytes]], method: bytes, expected: str
) -> None:
    assert route_of(tmp_path, SERVICE_RULES, request(path, headers, method)) == expected


def test_a_grpc_match_needs_a_grpc_call(tmp_path: Path) -> None:
    rules = "services: {inventory: {route_rules: [{name: g, match: {grpc: {service: a.B}}}]}}"
    assert route_of(tmp_path, rules, request(b"/v1/invoke/inventory/a.B/C")) == "invoke"
    assert route_of(tmp_path, rules, request(b"/v1/invoke/inventory/a.B/C", GRPC)) == "g"


def test_first_match_wins_and_all_conditions_must_hold(tmp_path: Path) -> None:
    rules = """
    services:
      inventory:
        route_rules:
          - name: both
            match: {path: {prefix: /a}, headers: [{name: x-v, exact: '2'}]}
          - {name: path-only, match: {path: {prefix: /a}}}
          - {name: all}
    """
    assert route_of(tmp_path, rules, request(b"/v1/invoke/inventory/a", [(b"x-v", b"2")])) == "both"
    assert route_of(tmp_path, rules, request(b"/v1/invoke/inventory/a")) == "path-only"
    assert route_of(tmp_path, rules, request(b"/v1/invoke/inventory/b")) == "all"


def test_listener_rules_come_first_and_see_every_call(tmp_path: Path) -> None:
    rules = """
    route_rules:
      - name: to-billing
        match: {headers: [{name: x-to, exact: billing}]}
        destinations: [{service: billing}]
      - {name: debug, match: {headers: [{name: x-debug, present: true}]}}
    services:
      inventory:
        route_rules: [{name: inv-all}]
    """
    handler, _ = outbound(tmp_path, rules)

    def check() -> None:
        to_billing = request(headers=[(b"x-to", b"billing")])
        service, path, _, _, route = handler._resolve_by_rules(to_billing)
        assert (service, path, route) == ("billing", b"/items", "to-billing")
        # A listener rule without destinations: where the call goes anyway, under its name.
        service, path, _, _, route = handler._resolve_by_rules(
            request(headers=[(b"x-debug", b"1")])
        )
        assert (service, path, route) == ("inventory", b"/items", "debug")
        assert handler._resolve_by_rules(request())[4] == "inv-all"

    in_loop(check)


def test_a_service_without_rules_routes_as_before(tmp_path: Path) -> None:
    handler, _ = outbound(tmp_path, "services: {inventory: {route_rules: [{name: r}]}}")
    assert handler._listener_rules is None
    assert "billing" not in handler._service_rules
    assert (
        in_loop(lambda: handler._resolve_by_rules(request(b"/v1/invoke/billing/x")))[4] == "invoke"
    )


@pytest.mark.parametrize(
    ("rules", "key", "words"),
    [
        (
            "route_rules: [{name: r, match: {path: {regex: '(['}}, destinations: [{service: billing}]}]",
            "route_rules[0].match.path.regex",
            "not a valid regular expression",
        ),
        (
            "route_rules: [{name: r, match: {path: {exact: /a, prefix: /b}}}]",
            "route_rules[0].match.path",
            "exactly one of exact, prefix and regex",
        ),
        (
            "route_rules: [{name: r, match: {path: {prefix: a}}}]",
            "route_rules[0].match.path.prefix",
            "must start with '/'",
        ),
        (
            "route_rules: [{name: r, match: {headers: [{name: 'x y', exact: a}]}}]",
            "route_rules[0].match.headers[0].name",
            "not a valid header name",
        ),
        (
            "route_rules: [{name: r, match: {headers: [{name: x, exact: a, absent: true}]}}]",
            "route_rules[0].match.headers[0]",
            "exactly one of exact, prefix, regex, present: true and absent: true",
        ),
        (
            "route_rules: [{name: r, match: {query: [{name: q, regex: '*'}]}}]",
            "route_rules[0].match.query[0].regex",
            "not a valid regular expression",
        ),
        (
            "route_rules: [{name: r, match: {grpc: {method: Get}}}]",
            "route_rules[0].match.grpc.service",
            "must name a gRPC service",
        ),
        (
            "route_rules: [{name: r, match: {methods: ['G T']}}]",
            "route_rules[0].match.methods[0]",
            "not an HTTP method",
        ),
        (
            "route_rules: [{name: r, match: {pathx: {}}}]",
            "route_rules[0].match.pathx",
            "unknown key",
        ),
        ("route_rules: [{name: 'a b'}]", "route_rules[0].name", "letters, digits"),
        (
            "route_rules: [{name: r}]\nservices: {inventory: {route_rules: [{name: r}]}}",
            "services.inventory.route_rules[0].name",
            "already the name of route_rules[0]",
        ),
        (
            "route_rules: [{name: r, destinations: [{subset: v2}]}]",
            "route_rules[0].destinations[0].service",
            "must name a service at the listener level",
        ),
        (
            "services: {inventory: {route_rules: [{name: r, destinations: [{subset: v3}]}]}}",
            "services.inventory.route_rules[0].destinations[0].subset",
            "'v3' is not a subset of 'inventory'",
        ),
        (
            "services: {inventory: {subsets: {v2: {version: v2}}, route_rules: "
            "[{name: r, destinations: [{subset: v2, weight: 10}, {}]}]}}",
            "services.inventory.route_rules[0].destinations[1].weight",
            "must be set when a rule has several destinations",
        ),
        (
            "services: {inventory: {subsets: {v2: {version: v2}}, route_rules: "
            "[{name: r, destinations: [{subset: v2, weight: 0}, {weight: 0}]}]}}",
            "services.inventory.route_rules[0].destinations",
            "must not all be 0",
        ),
        (
            "services: {inventory: {subsets: {v2: {}}}}",
            "services.inventory.subsets.v2",
            "at least one metadata key",
        ),
    ],
)
def test_bad_rules_are_refused_at_load_naming_the_key(
    tmp_path: Path, rules: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, rules)
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)


def test_the_index_finds_what_a_scan_of_every_rule_finds() -> None:
    from sidecar.config import GrpcMatch, HeaderMatch, PathMatch, RouteMatch, RouteRule
    from sidecar.traffic.table import RuleTable

    def rule(name: str, **match: object) -> RouteRule:
        return RouteRule(name=name, match=RouteMatch(**match))  # type: ignore[arg-type]

    header = (HeaderMatch(name="x-a", present=True),)
    specs = (
        rule("api-v1", path=PathMatch(prefix="/api/v1/")),
        rule("hdr", headers=header),  # not indexed: tried on every call
        rule("items", path=PathMatch(exact="/api/items")),
        rule("short", path=PathMatch(prefix="/ap")),  # ends inside the first segment
        rule("api-any", path=PathMatch(prefix="/api/")),
        rule("grpc", grpc=GrpcMatch(service="shop.Inv")),
        rule("rx", path=PathMatch(regex="/x/[0-9]+")),
        rule("api-hdr", path=PathMatch(prefix="/api/"), headers=header),
        rule("tenant-a", headers=(HeaderMatch(name="X-T", exact="a"),)),
        rule("tenant-b-api", headers=(HeaderMatch(name="x-t", exact="b"),), methods=("POST",)),
        rule("late-api", path=PathMatch(prefix="/api/v1/")),
    )
    table = RuleTable(specs, "route_rules", "inventory")
    grpc = [(b"content-type", b"application/grpc")]
    for path in (
        b"/api/v1/a", b"/api/items", b"/api/items?x=1", b"/api/items/2", b"/api", b"/apx",
        b"/ap", b"/x/12", b"/shop.Inv/Get", b"/other", b"/", b"*", b"/api/v1",
    ):  # fmt: skip
        for headers in (
            [], [(b"x-a", b"1")], grpc, [(b"x-t", b"a")], [(b"x-t", b"b")],
            [(b"x-t", b"a"), (b"x-t", b"b")], [(b"x-t", b"b"), (b"x-a", b"")],
        ):  # fmt: skip
            req = request(path, headers, b"POST")
            scan = next((r for r in table.rules if r.matcher.matches(req, path)), None)
            assert table.match(req, path) is scan, (path, headers)


def test_the_rule_cost_bench_runs_each_shape() -> None:
    from bench.rulecost import SHAPES, per_call_us, table

    for shape in SHAPES:
        assert per_call_us(3, 10, shape, rounds=1) > 0
        last = table(200, shape).match(request(b"/items", [(b"x-tenant", b"nobody")]), b"/items")
        assert last is not None and last.name == "last"
