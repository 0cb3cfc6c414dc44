"""Load-balancing policies: pick one endpoint of a cluster for a call.

Round robin spreads calls evenly; least-request uses the power of two choices
(two random endpoints, the one with fewer calls in flight wins), which needs
no global scan and avoids herding onto one idle endpoint; ring hash sends every
call with the same key (a header's value) to the same endpoint while the set is
stable, and moves only about 1/n of the keys when an endpoint comes or goes.
`prefer_zone()` narrows a set to the caller's zone; the cluster applies it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Collection, Sequence
from typing import Protocol

from sidecar.discovery.base import Endpoint

# Points on the ring per unit of weight (ketama's 160 is the classic figure): enough for
# an even spread, built once per endpoint set, not per call. A fixed count per endpoint
# (rather than a fixed ring size shared out) keeps the others' points in place when one
# endpoint comes or goes, so only its keys move.
POINTS_PER_WEIGHT = 160


class Balancer(Protocol):
    def pick(
        self,
        endpoints: Sequence[Endpoint],
        active: dict[Endpoint, int],
        exclude: Collection[Endpoint] = (),
        key: bytes | None = None,
    ) -> Endpoint | None: ...


def _candidates(endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> Sequence[Endpoint]:
    if not exclude:
        return endpoints
    rest = [e for e in endpoints if e not in exclude]
    # Every endpoint already tried: trying one again beats failing the call.
    return rest or endpoints


def prefer_zone(endpoints: Sequence[Endpoint], zone: str) -> Sequence[Endpoint]:
    """The endpoints in `zone` when there are any (and a zone is set), else all of them."""
    if not zone:
        return endpoints
    local = [e for e in endpoints if e.zone == zone]
    return local or endpoints


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        active: dict[Endpoint, int],
        exclude: Collection[Endpoint] = (),
        key: bytes | None = None,
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
        key: bytes | None = None,
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


def _hash(data: bytes) -> int:
    # Stable across processes and runs (unlike hash()), so every caller maps a key alike.
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class RingHash:
    """Consistent hashing (Karger's ring, as Envoy's ring_hash): points in proportion to
    each endpoint's weight; a key goes to the first point clockwise from its hash. Calls without a
    key fall back to round robin."""

    def __init__(self, points_per_weight: int = POINTS_PER_WEIGHT) -> None:
        self._points = points_per_weight
        self._fallback = RoundRobin()
        self._built_for: tuple[Endpoint, ...] = ()
        self._hashes: list[int] = []
        self._owners: list[Endpoint] = []

    def _ring(self, endpoints: Sequence[Endpoint]) -> None:
        key = tuple(endpoints)
        if key == self._built_for and self._hashes:
            return
        points: list[tuple[int, Endpoint]] = []
        for endpoint in key:
            # The endpoint's identity (address), not its position, names its points: the
            # others' points stay put when one endpoint joins or leaves.
            replicas = self._points * max(endpoint.weight, 1)
            name = endpoint.address.encode()
            points.extend((_hash(b"%s_%d" % (name, i)), endpoint) for i in range(replicas))
        points.sort(key=lambda p: (p[0], p[1].address))
        self._built_for = key
        self._hashes = [h for h, _ in points]
        self._owners = [e for _, e in points]

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        active: dict[Endpoint, int],
        exclude: Collection[Endpoint] = (),
        key: bytes | None = None,
    ) -> Endpoint | None:
        if key is None:
            return self._fallback.pick(endpoints, active, exclude)
        if not endpoints:
            return None
        self._ring(endpoints)
        count = len(self._hashes)
        start = bisect.bisect_left(self._hashes, _hash(key)) % count
        if not exclude:
            return self._owners[start]
        # Walk clockwise to the first endpoint not tried yet (a resend), so a key's
        # second choice is stable too.
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner not in exclude:
                return owner
        return self._owners[start]


def make_balancer(policy: str) -> Balancer:
    if policy == "least_request":
        return LeastRequest()
    if policy == "round_robin":
        return RoundRobin()
    if policy == "ring_hash":
        return RingHash()
    raise ValueError(f"unknown lb_policy {policy!r}")
