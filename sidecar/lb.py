"""Load-balancing policies: pick one endpoint of a cluster for a call.

Round robin spreads calls evenly; least-request uses the power of two choices
(two random endpoints, the one with fewer calls in flight wins), which needs
no global scan and avoids herding onto one idle endpoint.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol

from sidecar.discovery.base import Endpoint


class Balancer(Protocol):
    def pick(
        self,
        endpoints: Sequence[Endpoint],
        active: dict[Endpoint, int],
        exclude: Collection[Endpoint] = (),
    ) -> Endpoint | None: ...


def _candidates(endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> Sequence[Endpoint]:
    if not exclude:
        return endpoints
    rest = [e for e in endpoints if e not in exclude]
    # Every endpoint already tried: trying one again beats failing the call.
    return rest or endpoints


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        active: dict[Endpoint, int],
        exclude: Collection[Endpoint] = (),
    ) -> Endpoint | None:
        candidates = _candidates(endpoints, exclude)
        if not candidates:
            return None
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]


class LeastRequest:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        active: dict[Endpoint, int],
        exclude: Collection[Endpoint] = (),
    ) -> Endpoint | None:
        candidates = _candidates(endpoints, exclude)
        count = len(candidates)
        if count == 0:
            return None
        if count == 1:
            return candidates[0]
        first, second = self._rng.sample(range(count), 2)
        a, b = candidates[first], candidates[second]
        return a if active.get(a, 0) <= active.get(b, 0) else b


def make_balancer(policy: str) -> Balancer:
    if policy == "least_request":
        return LeastRequest()
    if policy == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown lb_policy {policy!r}")
