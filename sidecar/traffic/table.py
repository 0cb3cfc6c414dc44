"""Route rule tables, compiled once per config: a level's rules in order, each rule's
destinations, and what a call that matched runs (the destination's cluster and chain).

`RuleTable.match()` finds the first rule whose match holds; `Rule.pick()` takes one of
its destinations by weight (split.WeightedPick). A destination's cluster (a service's,
or a subset of it) and its chain are made on its first call and kept, so a rule's
filters keep their state (retry budgets, token buckets) across calls, as a service's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.errors import UnknownService
from sidecar.traffic.match import Facts, Matcher, compile_match
from sidecar.traffic.split import WeightedPick

if TYPE_CHECKING:
    from prometheus_client import Counter

    from sidecar.call import Next
    from sidecar.cluster import Cluster
    from sidecar.config.routerules import RouteRule
    from sidecar.messages import Request

# (rule, service, cluster) -> the chain of the rule's calls to that cluster.
ChainBuilder = Callable[["Rule", str, "Cluster"], "Next"]
ClusterLookup = Callable[[str, str], "Cluster | None"]  # (service, subset) -> its cluster


class Target:
    """One destination of a rule: a service, optionally a subset, and its chain."""

    __slots__ = ("chain", "cluster", "counted", "rule", "service", "subset")

    def __init__(self, rule: Rule, service: str, subset: str) -> None:
        self.rule = rule
        self.service = service
        self.subset = subset
        self.cluster: Cluster | None = None
        self.chain: Next | None = None
        self.counted: Counter | None = None  # opus_route_requests{route, service, subset}

    def resolve(self, lookup: ClusterLookup, build: ChainBuilder) -> tuple[Cluster, Next]:
        cluster, chain = self.cluster, self.chain
        if cluster is None or chain is None:
            cluster = lookup(self.service, self.subset)
            if cluster is None:
                raise UnknownService(f"unknown service {self.service!r}", service=self.service)
            chain = build(self.rule, self.service, cluster)
            self.cluster, self.chain = cluster, chain
        return cluster, chain


class Rule:
    """A compiled route rule."""

    __slots__ = ("_by_service", "_pick", "key", "matcher", "name", "position", "spec", "targets")

    def __init__(self, spec: RouteRule, key: str, default_service: str, position: int = 0) -> None:
        self.spec = spec
        self.key = key
        self.position = position  # in its table: the first match is the lowest
        self.name = spec.name
        self.matcher: Matcher = compile_match(spec.match, f"{key}.match")
        self.targets = tuple(
            Target(self, d.service or default_service, d.subset) for d in spec.destinations
        )
        self._pick: WeightedPick | None = None
        if len(self.targets) > 1:
            self._pick = WeightedPick(tuple(d.weight or 0 for d in spec.destinations))
        # A rule without destinations sends each call where it was going (per service).
        self._by_service: dict[str, Target] = {}

    def pick(self) -> Target | None:
        """The destination of the next call; None when the rule names none."""
        targets = self.targets
        if not targets:
            return None
        pick = self._pick
        return targets[0] if pick is None else targets[pick.pick()]

    def target_for(self, service: str) -> Target:
        target = self._by_service.get(service)
        if target is None:
            target = self._by_service[service] = Target(self, service, "")
        return target


IndexKey = tuple[str, bytes, bytes]  # (kind, name, value); name is b"" but for headers


def _index_key(spec: RouteRule) -> IndexKey | None:
    """What a rule can be found by on a call: ("exact", b"", path) for an exact path;
    ("segment", b"", first) when every path it matches starts with `/first/` (a prefix
    that reaches past its first segment, or a gRPC service); ("header", name, value) for
    a header's exact value; None: tried on every call."""
    match = spec.match
    if match.path is not None:
        if match.path.exact:
            return "exact", b"", match.path.exact.encode()
        first, slash, _ = match.path.prefix[1:].partition("/")
        if match.path.prefix and slash:
            return "segment", b"", first.encode()
    if match.grpc is not None:
        return "segment", b"", match.grpc.service.encode()
    for header in match.headers:
        if header.exact is not None:
            return "header", header.name.lower().encode(), header.exact.encode("latin-1")
    return None


class RuleTable:
    """One level's rules (the listener's, or one service's), first match wins.

    Tried in order, but only those the call can match: a rule with an exact path, a
    prefix past the first path segment, a gRPC service or a header's exact value is
    indexed by it, so with many rules a call tests the few its path and headers point
    at, and the unindexed ones, not all of them. Every candidate list keeps the rules'
    order, so the first match is the one a scan of every rule would find.
    """

    __slots__ = ("_by_exact", "_by_header", "_by_segment", "_unindexed", "rules")

    def __init__(self, specs: tuple[RouteRule, ...], key: str, default_service: str = "") -> None:
        self.rules = tuple(
            Rule(spec, f"{key}[{i}]", default_service, i) for i, spec in enumerate(specs)
        )
        unindexed: list[int] = []
        groups: dict[IndexKey, list[int]] = {}
        for i, spec in enumerate(specs):
            index_key = _index_key(spec)
            if index_key is None:
                unindexed.append(i)
            else:
                groups.setdefault(index_key, []).append(i)

        def ordered(group: list[int]) -> tuple[Rule, ...]:
            return tuple(self.rules[i] for i in sorted({*unindexed, *group}))

        self._unindexed = ordered([])
        self._by_exact: dict[bytes, tuple[Rule, ...]] = {}
        self._by_segment: dict[bytes, tuple[Rule, ...]] = {}
        self._by_header: dict[bytes, dict[bytes, tuple[Rule, ...]]] = {}
        for (kind, name, value), group in groups.items():
            if kind == "exact":
                self._by_exact[value] = ordered(group)
            elif kind == "segment":
                self._by_segment[value] = ordered(group)
            else:
                self._by_header.setdefault(name, {})[value] = ordered(group)

    def candidates(self, facts: Facts) -> tuple[Rule, ...]:
        """The rules that may match the call, in order."""
        hits: list[tuple[Rule, ...]] = []
        if self._by_exact:
            found = self._by_exact.get(facts.only_path)
            if found is not None:
                hits.append(found)
        if self._by_segment:
            found = self._by_segment.get(_first_segment(facts.only_path))
            if found is not None:
                hits.append(found)
        for name, values in self._by_header.items():
            value = facts.header(name)
            if value is not None:
                found = values.get(value)
                if found is not None:
                    hits.append(found)
        if not hits:
            return self._unindexed
        if len(hits) == 1:
            return hits[0]
        return tuple(sorted({rule for hit in hits for rule in hit}, key=_position))

    def match(self, request: Request, path: bytes) -> Rule | None:
        facts = Facts(request, path)
        for rule in self.candidates(facts):
            if rule.matcher.holds(facts):
                return rule
        return None


def _position(rule: Rule) -> int:
    return rule.position


def _first_segment(path: bytes) -> bytes:
    """`/api/v2/x` -> `api`; `/items` -> `items`."""
    slash = path.find(b"/", 1)
    return path[1:] if slash < 0 else path[1:slash]
