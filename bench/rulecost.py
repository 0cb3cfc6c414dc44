"""`python -m bench.rulecost`: what finding a call's route rule costs, by rule count.

Builds a service's rule table as the sidecar does (sidecar.traffic.table.RuleTable) with
N rules of one shape (`--shape`: path prefixes, exact header values, header regexes),
the call matching only the last, and times `match()` in process (perf_counter, the best
of several rounds, since the figure moves with the machine's load). The issue-18
target: with 200 rules, at most 5 µs per call over a table of one.

    python -m bench.rulecost --rules 1 200 --calls 20000 [--shape path header scan]
"""

from __future__ import annotations

import argparse
import time

from sidecar.config import HeaderMatch, PathMatch, RouteMatch, RouteRule
from sidecar.messages import Request, fixed_body
from sidecar.traffic.table import RuleTable

SHAPES = ("path", "header", "scan")


def _match(shape: str, i: int) -> RouteMatch:
    """path: a prefix of its own first segment (indexed by it); header: an exact header
    value of its own (indexed by it); scan: a header regex (tried on every call)."""
    if shape == "path":
        return RouteMatch(path=PathMatch(prefix=f"/api{i}/"), methods=("GET",))
    if shape == "header":
        return RouteMatch(headers=(HeaderMatch(name="x-tenant", exact=f"t{i}"),))
    return RouteMatch(headers=(HeaderMatch(name="x-tenant", regex=f"t{i}"),))


def table(rules: int, shape: str) -> RuleTable:
    specs = [RouteRule(name=f"r{i}", match=_match(shape, i)) for i in range(rules - 1)]
    specs.append(RouteRule(name="last", match=RouteMatch(path=PathMatch(prefix="/"))))
    return RuleTable(tuple(specs), "services.inventory.route_rules", "inventory")


def per_call_us(rules: int, calls: int, shape: str = "path", rounds: int = 5) -> float:
    """Microseconds per match() of a call that only the table's last rule matches."""
    rule_table = table(rules, shape)
    headers = [(b"x-tenant", b"nobody"), (b"accept", b"*/*"), (b"user-agent", b"bench")]
    request = Request(b"GET", b"/items?id=7", b"inventory", headers, fixed_body())
    path = request.path
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            rule_table.match(request, path)
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rulecost")
    p.add_argument("--rules", type=int, nargs="+", default=[1, 200])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--shape", choices=SHAPES, nargs="+", default=list(SHAPES))
    args = p.parse_args()
    for shape in args.shape:
        base = None
        for rules in args.rules:
            us = per_call_us(rules, args.calls, shape)
            base = us if base is None else base
            over = f"{us - base:+.3f} over {args.rules[0]}"
            print(f"{shape:6s} {rules:4d} rules: {us:8.3f} us per call ({over})")


if __name__ == "__main__":
    main()
