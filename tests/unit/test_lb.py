"""Load-balancing policies."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.discovery.base import Endpoint
from sidecar.lb import LeastRequest, RoundRobin, make_balancer

A = Endpoint("10.0.0.1", 15006)
B = Endpoint("10.0.0.2", 15006)
C = Endpoint("10.0.0.3", 15006)


def test_round_robin_cycles() -> None:
    rr = RoundRobin()
    assert [rr.pick([A, B, C], {}) for _ in range(7)] == [A, B, C, A, B, C, A]


def test_round_robin_honours_exclude() -> None:
    rr = RoundRobin()
    picks = [rr.pick([A, B, C], {}, exclude={B}) for _ in range(4)]
    assert picks == [A, C, A, C]


def test_round_robin_survives_the_set_shrinking() -> None:
    rr = RoundRobin()
    assert [rr.pick([A, B, C], {}) for _ in range(3)] == [A, B, C]
    assert rr.pick([A], {}) == A
    assert rr.pick([A, B], {}) in (A, B)


def test_least_request_prefers_the_less_loaded_of_two() -> None:
    lr = LeastRequest(random.Random(7))
    active = {A: 5, B: 0}
    assert {lr.pick([A, B], active) for _ in range(50)} == {B}
    active = {A: 0, B: 5}
    assert {lr.pick([A, B], active) for _ in range(50)} == {A}


def test_least_request_never_picks_the_most_loaded_of_three() -> None:
    lr = LeastRequest(random.Random(1))
    counts = Counter(lr.pick([A, B, C], {A: 9, B: 0, C: 3}) for _ in range(300))
    assert counts[A] == 0
    # B wins every pair it is in (2 of the 3 pairs), C wins only the A-C pair.
    assert counts[B] > counts[C] > 0


def test_least_request_is_deterministic_for_a_seed() -> None:
    def sequence(seed: int) -> list[Endpoint | None]:
        lr = LeastRequest(random.Random(seed))
        return [lr.pick([A, B, C], {}) for _ in range(20)]

    assert sequence(3) == sequence(3)


def test_least_request_honours_exclude() -> None:
    lr = LeastRequest(random.Random(0))
    assert {lr.pick([A, B, C], {B: 100, C: 100}, exclude={A}) for _ in range(30)} == {B, C}


@pytest.mark.parametrize("policy", ["round_robin", "least_request"])
def test_single_endpoint_is_always_picked(policy: str) -> None:
    balancer = make_balancer(policy)
    assert balancer.pick([A], {A: 1000}) == A
    assert balancer.pick([A], {}, exclude={A}) == A


@pytest.mark.parametrize("policy", ["round_robin", "least_request"])
def test_no_endpoints_is_none(policy: str) -> None:
    balancer = make_balancer(policy)
    assert balancer.pick([], {}) is None
    assert balancer.pick([], {}, exclude={A}) is None


@pytest.mark.parametrize("policy", ["round_robin", "least_request"])
def test_excluding_every_endpoint_falls_back_to_all(policy: str) -> None:
    balancer = make_balancer(policy)
    picks = {balancer.pick([A, B], {}, exclude={A, B}) for _ in range(40)}
    assert picks == {A, B}


def test_make_balancer_names() -> None:
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer("least_request"), LeastRequest)
    with pytest.raises(ValueError, match="random"):
        make_balancer("random")
