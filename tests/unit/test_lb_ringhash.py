"""Ring hash: keys stick to one endpoint while the set is stable and few move when it changes."""

from __future__ import annotations

from collections import Counter

from sidecar.discovery.base import Endpoint
from sidecar.lb import RingHash, make_balancer, prefer_zone

EPS = [Endpoint(f"10.0.0.{i}", 15006) for i in range(1, 6)]


def test_a_key_sticks_to_one_endpoint() -> None:
    ring = RingHash()
    for key in (b"user-1", b"user-2", b"alice"):
        picks = {ring.pick(EPS, {}, (), key) for _ in range(20)}
        assert len(picks) == 1


def test_same_mapping_in_another_process_instance_and_order() -> None:
    keys = [f"k{i}".encode() for i in range(200)]
    one, other = RingHash(), RingHash()
    first = [one.pick(EPS, {}, (), k) for k in keys]
    second = [other.pick(sorted(EPS, key=lambda e: e.host, reverse=True), {}, (), k) for k in keys]
    assert first == second


def test_keys_spread_and_only_the_removed_endpoints_keys_move() -> None:
    ring = RingHash()
    keys = [f"user-{i}".encode() for i in range(2000)]
    before = {k: ring.pick(EPS, {}, (), k) for k in keys}
    spread = Counter(before.values())
    assert len(spread) == 5 and min(spread.values()) > 200
    smaller = [e for e in EPS if e != EPS[2]]
    after = {k: ring.pick(smaller, {}, (), k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == EPS[2] for k in moved)


def test_no_key_falls_back_to_round_robin() -> None:
    ring = RingHash()
    assert [ring.pick(EPS[:3], {}, ()) for _ in range(3)] == EPS[:3]


def test_exclude_walks_to_a_stable_next_endpoint() -> None:
    ring = RingHash()
    first = ring.pick(EPS, {}, (), b"k")
    assert first is not None
    second = ring.pick(EPS, {}, (first,), b"k")
    assert second is not None and second != first
    assert ring.pick(EPS, {}, (first,), b"k") == second


def test_weights_shift_the_share() -> None:
    heavy = [Endpoint("10.0.0.1", 1, weight=3), Endpoint("10.0.0.2", 1, weight=1)]
    ring = RingHash()
    counts = Counter(ring.pick(heavy, {}, (), f"u{i}".encode()) for i in range(4000))
    assert counts[heavy[0]] > 2 * counts[heavy[1]]


def test_factory_and_zone_preference() -> None:
    assert isinstance(make_balancer("ring_hash"), RingHash)
    a, b = Endpoint("a", 1, zone="z1"), Endpoint("b", 1, zone="z2")
    assert prefer_zone([a, b], "z2") == [b]
    assert prefer_zone([a, b], "z9") == [a, b]
    assert prefer_zone([a, b], "") == [a, b]
