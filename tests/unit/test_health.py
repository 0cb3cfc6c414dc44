"""Outlier detection and active-check state with an injected clock; the cluster's use
of them (candidate sets, zone preference, panic routing). No sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.cluster import Cluster
from sidecar.config import HealthCheckConfig, OutlierConfig
from sidecar.discovery.base import Endpoint
from sidecar.errors import PoolExhausted, UpstreamConnectError
from sidecar.health import ActiveChecker, HealthChecks, OutlierDetector
from sidecar.lb import RoundRobin
from sidecar.messages import Request, Response, fixed_body
from sidecar.metrics import Metrics

A = Endpoint("10.0.0.1", 1, zone="z1")
B = Endpoint("10.0.0.2", 1, zone="z2")
C = Endpoint("10.0.0.3", 1, zone="z1")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _detector(clock: Clock, **kw: Any) -> OutlierDetector:
    config = OutlierConfig(
        consecutive_5xx=3,
        consecutive_connect_failures=2,
        base_ejection_time=10.0,
        max_ejection_time=25.0,
        **kw,
    )
    detector = OutlierDetector(config, now=clock)
    detector.update([A, B, C])
    return detector


def test_consecutive_5xx_eject_and_a_success_resets_the_count() -> None:
    clock = Clock()
    d = _detector(clock)
    assert not d.record(A, 500) and not d.record(A, 503)
    d.record(A, 200)
    assert not d.record(A, 502) and not d.record(A, 502)
    assert d.record(A, 502)
    assert d.ejected == {A}
    assert d.next_return == 110.0


def test_connect_failures_eject_sooner_and_local_errors_do_not_count() -> None:
    clock = Clock()
    d = _detector(clock)
    for _ in range(5):
        assert not d.record(B, PoolExhausted("full"))
    assert not d.record(B, UpstreamConnectError("refused"))
    assert d.record(B, UpstreamConnectError("refused"))


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    clock = Clock()
    d = _detector(clock)
    durations = []
    for _ in range(3):
        for _ in range(3):
            d.record(A, 500)
        durations.append(d.next_return - clock.t)
        clock.t = d.next_return
        assert d.expire() and d.ejected == frozenset()
    assert durations == [10.0, 20.0, 25.0]  # base x n, capped at max_ejection_time


def test_ejection_multiplier_decays_while_the_endpoint_stays_healthy() -> None:
    clock = Clock()
    d = _detector(clock)
    for _ in range(3):
        d.record(A, 500)
    clock.t = d.next_return
    d.expire()
    clock.t += 100.0  # long healthy stretch: back to the base time
    for _ in range(3):
        d.record(A, 500)
    assert d.next_return - clock.t == 10.0


def test_never_more_than_max_ejection_percent() -> None:
    clock = Clock()
    d = _detector(clock, max_ejection_percent=50.0)
    for endpoint in (A, B, C):
        for _ in range(3):
            d.record(endpoint, 500)
    assert len(d.ejected) == 1  # a second would be 66% > 50%


def test_a_lone_endpoint_is_never_ejected_below_100_percent() -> None:
    clock = Clock()
    d = OutlierDetector(OutlierConfig(consecutive_5xx=1), now=clock)
    d.update([A])
    assert not d.record(A, 500)
    assert d.ejected == frozenset()


def test_endpoints_leaving_the_set_are_forgotten() -> None:
    clock = Clock()
    d = _detector(clock)
    for _ in range(3):
        d.record(A, 500)
    d.update([B, C])
    assert d.ejected == frozenset() and d.next_return == float("inf")


def test_active_checks_thresholds() -> None:
    changes: list[int] = []
    h = HealthChecks(
        HealthCheckConfig(enabled=True, healthy_threshold=2, unhealthy_threshold=2),
        on_change=lambda: changes.append(1),
    )
    h.update([A, B])
    assert not h.result(A, False)
    assert h.result(A, False) and h.unhealthy == {A}
    assert not h.result(A, True)
    assert h.result(A, True) and h.unhealthy == frozenset()
    assert len(changes) == 2
    assert not h.result(Endpoint("9.9.9.9", 9), False)  # not in the set any more


def test_active_checker_drives_probes() -> None:
    async def main() -> None:
        config = HealthCheckConfig(enabled=True, interval=0.01, unhealthy_threshold=1)
        checks = HealthChecks(config)
        checks.update([A, B])
        probed: list[Endpoint] = []
        done = asyncio.Event()

        async def probe(endpoint: Endpoint) -> bool:
            probed.append(endpoint)
            if len(probed) >= 4:
                done.set()
            return endpoint != B

        checker = ActiveChecker(config, checks, probe)
        checker.start()
        await asyncio.wait_for(done.wait(), 5)
        checker.stop()
        assert checks.unhealthy == {B}
        assert set(probed) == {A, B}

    asyncio.run(main())


class FakePool:
    protocol = "h2c"

    def __init__(self, answers: dict[Endpoint, Any]) -> None:
        self.answers = answers
        self.sent: list[Endpoint] = []

    async def request(
        self, endpoint: Endpoint, request: Request, authority: bytes, path: bytes
    ) -> Response:
        self.sent.append(endpoint)
        answer = self.answers.get(endpoint, 200)
        if isinstance(answer, BaseException):
            raise answer
        status, headers = answer if isinstance(answer, tuple) else (answer, [])
        return Response(status, headers, fixed_body(b"x"))

    def snapshot(self, endpoint: Endpoint) -> dict[str, Any]:
        return {}

    def connection_count(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _request(headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request(b"GET", b"/", b"svc", headers or [], fixed_body())


def test_cluster_prefers_its_zone_and_crosses_zones_on_resend() -> None:
    async def main() -> None:
        pool = FakePool({A: UpstreamConnectError("down"), C: UpstreamConnectError("down")})
        cluster = Cluster("svc", pool, RoundRobin(), zone="z1", outlier=OutlierConfig())
        cluster.update((A, B, C))
        response, endpoint = await cluster.forward(_request(), b"svc", b"/")
        assert endpoint == B and response.status == 200
        assert set(pool.sent[:2]) == {A, C}  # both local endpoints first

    asyncio.run(main())


def test_cluster_ejects_on_5xx_reports_health_and_returns_after_the_time() -> None:
    async def main() -> None:
        clock = Clock()
        metrics = Metrics()
        pool = FakePool({A: 500})
        cluster = Cluster(
            "svc",
            pool,
            RoundRobin(),
            metrics=metrics,
            now=clock,
            outlier=OutlierConfig(consecutive_5xx=2, base_ejection_time=5.0),
        )
        cluster.update((A, B))
        for _ in range(4):
            await cluster.forward(_request(), b"svc", b"/")
        assert cluster.health_of(A) == "ejected"
        sample = metrics.registry.get_sample_value
        assert sample("opus_endpoint_ejections_total", {"service": "svc"}) == 1
        assert sample("opus_endpoints_health", {"service": "svc", "health": "ejected"}) == 1
        pool.sent.clear()
        for _ in range(4):
            await cluster.forward(_request(), b"svc", b"/")
        assert pool.sent == [B] * 4
        clock.t += 5.0
        pool.answers[A] = 200
        for _ in range(4):
            await cluster.forward(_request(), b"svc", b"/")
        assert A in pool.sent and cluster.health_of(A) == "healthy"

    asyncio.run(main())


def test_cluster_resends_when_the_peer_says_its_app_never_saw_the_call() -> None:
    async def main() -> None:
        pool = FakePool(
            {A: (503, [(b"x-opus-error", b"UF")]), B: (503, [(b"x-opus-error", b"UC")])}
        )
        cluster = Cluster("svc", pool, RoundRobin(), resend_unavailable=True)
        cluster.update((A, Endpoint("10.0.0.4", 1)))
        response, endpoint = await cluster.forward(_request(), b"svc", b"/")
        assert response.status == 200 and endpoint.host == "10.0.0.4"
        # A 503 that may have reached the app is the caller's (or the retry filter's) to judge.
        cluster.update((B,))
        response, _ = await cluster.forward(_request(), b"svc", b"/")
        assert response.status == 503

    asyncio.run(main())


def test_cluster_routes_to_all_when_every_endpoint_fails_checks() -> None:
    async def main() -> None:
        pool = FakePool({})
        cluster = Cluster(
            "svc",
            pool,
            RoundRobin(),
            health_check=HealthCheckConfig(enabled=True, unhealthy_threshold=1),
        )
        cluster.update((A, B))
        assert cluster.health is not None
        cluster.health.result(A, False)
        cluster.health.result(B, False)
        _, endpoint = await cluster.forward(_request(), b"svc", b"/")
        assert endpoint in (A, B)  # panic routing beats failing every call

    asyncio.run(main())


def test_cluster_created_empty_waits_for_its_first_update() -> None:
    async def main() -> None:
        cluster = Cluster("svc", FakePool({}), RoundRobin())
        call = asyncio.create_task(cluster.forward(_request(), b"svc", b"/"))
        await asyncio.sleep(0)
        cluster.update((A,))
        _, endpoint = await asyncio.wait_for(call, 2)
        assert endpoint == A

    asyncio.run(main())
