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
from sidecar.traffic.match import Matcher, compile_match
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

    __slots__ = ("_by_service", "_pick", "key", "matcher", "name", "spec", "targets")

    def __init__(self, spec: RouteRule, key: str, default_service: str) -> None:
        self.spec = spec
        self.key = key
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


class RuleTable:
    """One level's rules (the listener's, or one service's), first match wins."""

    __slots__ = ("rules",)

    def __init__(self, specs: tuple[RouteRule, ...], key: str, default_service: str = "") -> None:
        self.rules = tuple(
            Rule(spec, f"{key}[{i}]", default_service) for i, spec in enumerate(specs)
        )

    def match(self, request: Request, path: bytes) -> Rule | None:
        for rule in self.rules:
            if rule.matcher.matches(request, path):
                return rule
        return None
