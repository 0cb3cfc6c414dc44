"""Mirroring (shadowing) on a route (a rule's `mirror`): a share of calls is also sent to
another service or subset, fire-and-forget. The copy runs in a task of its own; its
reply is read and discarded; nothing it does (hang, fail, answer 500) reaches the real
call, which never waits for it.

What a copy may hold is bounded: calls in flight at once (`max_in_flight`), one body's
size (`max_body_bytes`; a body still streaming is never copied, as that would make the
real call wait for it) and the bytes all copies hold together (`max_buffered_bytes`);
a copy past a bound is dropped, and counted by reason. A copy unanswered after
`timeout` is abandoned.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.chain import Filter
from sidecar.messages import Request, fixed_body

if TYPE_CHECKING:
    from prometheus_client import Counter

    from sidecar.call import Call, Next
    from sidecar.cluster import Cluster
    from sidecar.config.routerules import MirrorConfig
    from sidecar.messages import Response

log = logging.getLogger("sidecar.traffic")

MIRROR_HEADER = b"x-opus-mirror"  # on every copy, so its receiver can tell


class MirrorFilter(Filter):
    def __init__(
        self,
        config: MirrorConfig,
        cluster: Callable[[], Cluster | None],
        results: Callable[[str], Counter] | None = None,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = "mirror"
        self.config = config
        self.cluster = cluster  # the mirror's cluster, looked up when first needed
        self.authority = config.service.encode()
        self.results = results
        self.rand = rand
        self.in_flight = 0
        self.buffered = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def count(self, result: str) -> None:
        if self.results is not None:
            self.results(result).inc()

    async def handle(self, call: Call, next: Next) -> Response:
        percent = self.config.percent
        if percent >= 100 or self.rand() * 100 < percent:
            try:
                self.mirror(call)
            except Exception:  # the real call goes on whatever a copy does
                log.exception("mirroring a call to %s failed", self.config.service)
                self.count("failed")
        return await next(call)

    def mirror(self, call: Call) -> None:
        config = self.config
        request = call.request
        body = request.body
        if not body.complete:
            self.count("dropped_streaming")
            return
        size = body.received
        if size > config.max_body_bytes:
            self.count("dropped_body_size")
            return
        if self.in_flight >= config.max_in_flight:
            self.count("dropped_in_flight")
            return
        if self.buffered + size > config.max_buffered_bytes:
            self.count("dropped_buffered_bytes")
            return
        data = body.buffered_whole
        if data is None:
            data = body.read_nowait() or b""
            request.body = fixed_body(data, body.trailers)  # the real call's, intact
        headers = list(request.headers)
        headers.append((MIRROR_HEADER, b"1"))
        copy = Request(
            request.method,
            call.path,
            self.authority,
            headers,
            fixed_body(data, body.trailers),
            scheme=request.scheme,
            protocol=request.protocol,
            peer=request.peer,
            start=request.start,
        )
        self.in_flight += 1
        self.buffered += size
        task = asyncio.get_running_loop().create_task(self.send(copy, call.path, size))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, copy: Request, path: bytes, size: int) -> None:
        result = "failed"
        response: Response | None = None
        try:
            cluster = self.cluster()
            if cluster is not None:
                async with asyncio.timeout(self.config.timeout):
                    response, _ = await cluster.forward(copy, self.authority, path)
                    # Read to the end (and drop) so the connection can carry the next call.
                    while await response.body.read():
                        pass
                    response = None
                result = "sent"
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except TimeoutError:
            result = "timeout"
        except Exception as exc:
            log.debug("a mirrored call to %s failed: %s", self.config.service, exc)
        finally:
            if response is not None:
                response.body.cancel()  # abandoned mid-body: stop the upstream sending it
            self.in_flight -= 1
            self.buffered -= size
            self.count(result)

    def close(self) -> None:
        for task in tuple(self.tasks):
            task.cancel()
