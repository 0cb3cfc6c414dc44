"""Mirroring: copies go out fire-and-forget, the real call never waits for one or sees
its outcome, and what copies hold is bounded (in flight, one body, all bodies), every
drop counted by reason."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from sidecar.call import Call
from sidecar.config import MirrorConfig
from sidecar.discovery.base import Endpoint
from sidecar.messages import Body, Request, Response, fixed_body
from sidecar.metrics import Metrics
from sidecar.traffic.mirror import MIRROR_HEADER, MirrorFilter
from tests.unit.chain_helpers import make_call


class MirrorCluster:
    """Stands in for the mirror's cluster: hangs, fails or answers 500, as told."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.copies: list[tuple[Request, bytes]] = []
        self.release = asyncio.Event()

    async def forward(self, request: Request, authority: bytes, path: bytes) -> Any:
        self.copies.append((request, await read_all(request.body)))
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "fail":
            raise ConnectionError("mirror down")
        return Response(500, [], fixed_body(b"broken")), Endpoint("10.0.1.1", 1)


async def read_all(body: Body) -> bytes:
    parts = []
    while chunk := await body.read():
        parts.append(chunk)
    return b"".join(parts)


class Real:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, call: Call) -> Response:
        self.bodies.append(await read_all(call.request.body))
        return Response(200, [], fixed_body(b"real"))


def mirror(cluster: MirrorCluster, metrics: Metrics, **limits: Any) -> MirrorFilter:
    config = MirrorConfig(service="shadow", **limits)
    return MirrorFilter(config, lambda: cluster, partial(metrics.mirrors.labels, "r"))  # type: ignore[arg-type,return-value]


def count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "opus_mirror_requests_total", {"route": "r", "result": result}
    )
    return value or 0.0


def test_a_hanging_mirror_neither_delays_nor_fails_the_real_call() -> None:
    metrics = Metrics()
    cluster = MirrorCluster("hang")
    flt = mirror(cluster, metrics, max_in_flight=3)
    real = Real()

    async def main() -> list[int]:
        statuses = []
        for i in range(10):
            response = await flt.handle(make_call(body=b"body-%d" % i), real)
            statuses.append(response.status)
        await asyncio.sleep(0)  # let the copies start
        assert flt.in_flight == 3
        flt.close()
        await asyncio.sleep(0)
        return statuses

    assert asyncio.run(main()) == [200] * 10
    assert real.bodies == [b"body-%d" % i for i in range(10)]  # the real bodies intact
    assert [body for _, body in cluster.copies] == [b"body-0", b"body-1", b"body-2"]
    copy, _ = cluster.copies[0]
    assert (copy.authority, (MIRROR_HEADER, b"1") in copy.headers) == (b"shadow", True)
    assert count(metrics, "dropped_in_flight") == 7
    assert count(metrics, "cancelled") == 3
    assert flt.in_flight == 0 and flt.buffered == 0


def test_a_failing_or_500_mirror_is_counted_and_the_real_call_untouched() -> None:
    for mode, result in (("fail", "failed"), ("500", "sent")):
        metrics = Metrics()
        flt = mirror(MirrorCluster(mode), metrics)

        async def main(flt: MirrorFilter = flt) -> int:
            response = await flt.handle(make_call(body=b"x"), Real())
            await asyncio.gather(*flt.tasks)
            return response.status

        assert asyncio.run(main()) == 200
        assert count(metrics, result) == 1


def test_bodies_past_the_bounds_are_not_copied() -> None:
    metrics = Metrics()
    cluster = MirrorCluster("hang")
    flt = mirror(cluster, metrics, max_body_bytes=10, max_buffered_bytes=15)
    real = Real()

    async def main() -> None:
        await flt.handle(make_call(body=b"x" * 11), real)  # one body over max_body_bytes
        await flt.handle(make_call(body=b"a" * 10), real)  # held: 10 of 15
        await flt.handle(make_call(body=b"b" * 10), real)  # would be 20: over
        growing = make_call()
        growing.request.body = Body()  # still arriving: never waited for
        growing.request.body.feed(b"part")
        task = asyncio.ensure_future(flt.handle(growing, real))
        await asyncio.sleep(0)
        growing.request.body.finish()
        await task
        flt.close()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert count(metrics, "dropped_body_size") == 1
    assert count(metrics, "dropped_buffered_bytes") == 1
    assert count(metrics, "dropped_streaming") == 1
    assert [body for _, body in cluster.copies] == [b"a" * 10]
    assert real.bodies == [b"x" * 11, b"a" * 10, b"b" * 10, b"part"]


def test_a_share_of_calls_is_mirrored() -> None:
    metrics = Metrics()
    cluster = MirrorCluster("500")
    config = MirrorConfig(service="shadow", percent=30, max_in_flight=100)
    rolls = iter([0.1, 0.5, 0.29, 0.3, 0.9] * 20)
    flt = MirrorFilter(
        config,
        lambda: cluster,  # type: ignore[arg-type,return-value]
        partial(metrics.mirrors.labels, "r"),
        rand=lambda: next(rolls),
    )

    async def main() -> None:
        for _ in range(100):
            await flt.handle(make_call(), Real())
        await asyncio.gather(*flt.tasks)

    asyncio.run(main())
    assert len(cluster.copies) == 40  # 0.1 and 0.29 of every five rolls are under 30%
