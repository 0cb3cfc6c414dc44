"""Weighted destinations and subsets: a 90/10 split over 10,000 calls, subsets that hold
only the endpoints whose metadata matches (and follow discovery), 503 naming an empty
subset, and the metadata each discovery backend gives."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from sidecar.call import Call
from sidecar.cluster import SubsetCluster
from sidecar.discovery.base import Endpoint, Instance, endpoint_meta
from sidecar.discovery.consul import parse_health
from sidecar.discovery.file import instance_record, parse_record
from sidecar.discovery.nacos import parse_hosts
from sidecar.traffic.split import WeightedPick
from tests.unit.chain_helpers import read_response
from tests.unit.traffic_helpers import in_loop, outbound, request

CANARY = """
services:
  inventory:
    subsets:
      v1: {version: v1}
      v2: {version: v2}
      v3: {version: v3}
    route_rules:
      - name: empty
        match: {headers: [{name: x-v3, present: true}]}
        destinations: [{subset: v3}]
      - name: canary
        destinations: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
"""


def test_a_weighted_pick_gives_each_destination_its_weight_spread_out() -> None:
    pick = WeightedPick((90, 10))
    picks = [pick.pick() for _ in range(10_000)]
    share = picks.count(1) / len(picks) * 100
    assert abs(share - 10) <= 1.5
    assert share == 10  # counted, not drawn: exact over every whole round
    # Spread: the 10 of every 100 are apart, not in one burst.
    canary = [i for i, p in enumerate(picks[:100]) if p == 1]
    assert len(canary) == 10
    assert all(b - a == 10 for a, b in pairwise(canary))
    assert WeightedPick((0, 5)).pick() == 1


def test_a_90_10_split_over_10000_calls_lands_within_1_5_points(tmp_path: Path) -> None:
    handler, metrics = outbound(tmp_path, CANARY)

    def split() -> Counter[str]:
        counts: Counter[str] = Counter()
        for _ in range(10_000):
            _, path, cluster, _, route = handler._resolve_by_rules(request())
            assert (path, route) == (b"/items", "canary")
            counts[cluster.subset_name] += 1
        return counts

    counts = in_loop(split)
    assert abs(counts["v2"] / 100 - 10) <= 1.5
    assert counts["v1"] + counts["v2"] == 10_000
    sample = metrics.registry.get_sample_value
    labels = {"route": "canary", "service": "inventory"}
    assert sample("opus_route_requests_total", {**labels, "subset": "v2"}) == counts["v2"]
    assert sample("opus_route_requests_total", {**labels, "subset": "v1"}) == counts["v1"]


def test_subsets_hold_only_matching_endpoints_and_follow_discovery(tmp_path: Path) -> None:
    handler, _ = outbound(tmp_path, CANARY)

    def check() -> None:
        cluster = handler.clusters.get("inventory")
        assert cluster is not None
        v2 = cluster.subset("v2", {"version": "v2"})
        assert isinstance(v2, SubsetCluster)
        assert [e.host for e in v2.endpoints] == ["10.0.0.3"]
        assert cluster.subset("v2", {"version": "v2"}) is v2  # made once
        for _ in range(5):  # its balancer picks among its own endpoints only
            endpoint = v2.begin(request(), [])
            v2.release(endpoint)
            assert endpoint.host == "10.0.0.3"
        cluster.update(
            (
                Endpoint("10.0.0.4", 1, meta=frozenset({("version", "v2")})),
                Endpoint("10.0.0.5", 1, meta=frozenset({("version", "v1")})),
            )
        )
        assert [e.host for e in v2.endpoints] == ["10.0.0.4"]
        assert cluster.snapshot()["subsets"] == {"v2": ["10.0.0.4:1"]}

    in_loop(check)


def test_an_empty_subset_is_503_naming_it(tmp_path: Path) -> None:
    handler, _ = outbound(tmp_path, CANARY)

    async def main() -> tuple[int, bytes]:
        req = request(headers=[(b"x-v3", b"1")])
        service, path, cluster, chain, route = handler._resolve_by_rules(req)
        assert (route, cluster.endpoints) == ("empty", ())
        call = Call(req, "outbound", service, service.encode(), path, 1024)
        response = await chain(call)
        return response.status, await read_response(response)

    status, body = asyncio.run(main())
    assert status == 503
    assert b"subset 'v3' of service 'inventory' has no endpoint" in body


def test_endpoint_metadata_from_tags_and_a_mapping() -> None:
    assert endpoint_meta({"version": "v2"}, ["canary", "track=beta", "version=v1"]) == {
        ("version", "v2"),  # the mapping wins over a tag of the same key
        ("canary", "true"),
        ("track", "beta"),
    }
    assert endpoint_meta({"n": 1, 2: "x"}, "not-a-list") == frozenset()


def test_each_backend_gives_its_instances_metadata() -> None:
    consul = parse_health(
        [
            {
                "Node": {"Address": "10.0.0.1"},
                "Service": {
                    "ID": "a",
                    "Port": 15006,
                    "Tags": ["canary"],
                    "Meta": {"version": "v2"},
                },
            }
        ]
    )
    assert consul[0].meta == {("version", "v2"), ("canary", "true")}
    nacos = parse_hosts([{"ip": "10.0.0.2", "port": 15006, "metadata": {"version": "v2"}}])
    assert nacos[0].meta == {("version", "v2")}
    instance = Instance("inventory", "i-1", "10.0.0.3", 15006, tags=("blue",), meta={"v": "2"})
    data = json.dumps(instance_record(instance, ttl=1.0, updated=1.0)).encode()
    record = parse_record(data, default_ttl=1.0, default_id="x")
    assert record is not None
    assert record.endpoint.meta == {("v", "2"), ("blue", "true")}


def test_a_service_can_split_to_another_service(tmp_path: Path) -> None:
    rules = """
    services:
      inventory:
        route_rules:
          - name: move
            destinations: [{service: billing, weight: 1}, {weight: 3}]
    """
    handler, _ = outbound(tmp_path, rules)

    def split() -> Counter[str]:
        return Counter(handler._resolve_by_rules(request())[0] for _ in range(400))

    assert in_loop(split) == {"billing": 100, "inventory": 300}
