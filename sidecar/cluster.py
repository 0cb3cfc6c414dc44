"""Clusters: a service's endpoints (kept current by discovery), its balancer and its pool.

`forward()` is where a call meets the upstream: pick an endpoint among the healthy
ones (not ejected by outlier detection, passing active checks, in the caller's zone
when any such is), send, and when the peer provably never saw the call (connect
failure, refused stream, GOAWAY, or the peer sidecar answering that it could not reach
its app) send it again to another endpoint while the body can still be replayed.
Every outcome forward sees is fed to the outlier detector.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.config import (
    HealthCheckConfig,
    OutlierConfig,
)
from sidecar.discovery.base import Endpoint
from sidecar.errors import RETRY_SAFE, MeshError, NoHealthyUpstream
from sidecar.health import ActiveChecker, HealthChecks, Outcome, OutlierDetector
from sidecar.lb import Balancer
from sidecar.messages import Request, Response
from sidecar.metrics import Metrics
from sidecar.upstream.pool import Pool

log = logging.getLogger("sidecar.cluster")

# Resends of a call the peer never saw; each goes to another endpoint when there is one.
MAX_SAFE_RESENDS = 3
# A cluster created before discovery has its first endpoint set (a watch started on
# first use) holds its first calls this long for that set rather than failing them.
FIRST_UPDATE_TIMEOUT = 1.0
# A peer sidecar's own local replies (errors.py flags) that say its app never saw the
# call: it could not connect (UF), had no endpoint (UH), was full (UO) or was refused (UR).
_PEER_NEVER_SAW = frozenset({b"UF", b"UH", b"UO", b"UR"})


def _peer_never_saw(response: Response) -> bool:
    if response.status != 503:
        return False
    for name, value in response.headers:
        if name == b"x-opus-error":
            return value in _PEER_NEVER_SAW
    return False


class Cluster:
    def __init__(
        self,
        name: str,
        pool: Pool,
        balancer: Balancer,
        *,
        zone: str = "",
        hash_header: str = "",
        outlier: OutlierConfig | None = None,
        health_check: HealthCheckConfig | None = None,
        metrics: Metrics | None = None,
        resend_unavailable: bool = False,
        now: Callable[[], float] = time.monotonic,
        probe: Callable[[Endpoint], Awaitable[bool]] | None = None,
    ) -> None:
        self.name = name
        self.pool = pool
        self.balancer = balancer
        self.endpoints: tuple[Endpoint, ...] = ()
        self.active: dict[Endpoint, int] = {}
        self._zone = zone
        self._hash_header = hash_header.lower().encode() if hash_header else b""
        self._metrics = metrics
        self._resend_unavailable = resend_unavailable
        self._now = now
        self.outlier: OutlierDetector | None = None
        if outlier is not None and outlier.enabled:
            self.outlier = OutlierDetector(
                outlier, now=now, on_change=self._rebuild, on_eject=self._count_ejection
            )
        self.health: HealthChecks | None = None
        self._checker: ActiveChecker | None = None
        if health_check is not None and health_check.enabled:
            self.health = HealthChecks(health_check, on_change=self._rebuild)
            self._checker = ActiveChecker(health_check, self.health, probe)
        # Healthy endpoints (any zone), and the ones calls go to first (the caller's zone).
        self._healthy: tuple[Endpoint, ...] = ()
        self._preferred: tuple[Endpoint, ...] = ()
        self._first_update = asyncio.Event()
        self.subset_name = ""  # a SubsetCluster's; "" for the whole service
        self.subsets: dict[str, SubsetCluster] = {}

    # -- endpoint set and health ------------------------------------------------

    def update(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints
        if self.outlier is not None:
            self.outlier.update(endpoints)
        if self.health is not None:
            self.health.update(endpoints)
        self._rebuild()
        self._first_update.set()

    def _rebuild(self) -> None:
        """Recompute the candidate sets; runs on changes, not on every call."""
        ejected = self.outlier.ejected if self.outlier is not None else frozenset()
        unhealthy = self.health.unhealthy if self.health is not None else frozenset()
        out = ejected | unhealthy
        healthy = tuple(e for e in self.endpoints if e not in out) if out else self.endpoints
        # Panic routing (Envoy's panic threshold at its extreme): when every endpoint
        # looks unhealthy, the checks are more likely wrong than every peer.
        self._healthy = healthy or self.endpoints
        if self._zone:
            local = tuple(e for e in self._healthy if e.zone == self._zone)
            self._preferred = local or self._healthy
        else:
            self._preferred = self._healthy
        if self._metrics is not None:
            gauge = self._metrics.endpoints_health
            ejected_here = sum(1 for e in self.endpoints if e in ejected)
            unhealthy_here = sum(1 for e in self.endpoints if e in unhealthy and e not in ejected)
            gauge.labels(self.name, "healthy").set(
                len(self.endpoints) - len(out & set(self.endpoints))
            )
            gauge.labels(self.name, "ejected").set(ejected_here)
            gauge.labels(self.name, "unhealthy").set(unhealthy_here)
        for subset in self.subsets.values():
            subset.refresh()

    def subset(self, name: str, selector: dict[str, str]) -> Cluster:
        """The view of this cluster's endpoints whose metadata holds `selector` (made once)."""
        subset = self.subsets.get(name)
        if subset is None:
            subset = self.subsets[name] = SubsetCluster(self, name, frozenset(selector.items()))
        return subset

    def _count_ejection(self, endpoint: Endpoint) -> None:
        if self._metrics is not None:
            self._metrics.endpoint_ejections.labels(self.name).inc()

    def health_of(self, endpoint: Endpoint) -> str:
        if self.outlier is not None and endpoint in self.outlier.ejected:
            return "ejected"
        if self.health is not None and endpoint in self.health.unhealthy:
            return "unhealthy"
        return "healthy"

    def record(self, endpoint: Endpoint, outcome: Outcome) -> None:
        """Feed one call's outcome (status code or error) to outlier detection."""
        if self.outlier is not None:
            self.outlier.record(endpoint, outcome)

    def report(self, endpoint: Endpoint, outcome: Outcome) -> None:
        """For the proxy: a failure after the response head (a reset mid-body, a timeout).

        `forward()` already records the head's status and every error it sees, so this
        is for what happens later only; reporting the final status of every call again
        would count each call twice.
        """
        self.record(endpoint, outcome)

    def start(self) -> None:
        """Start active health checks, if enabled (needs a running loop)."""
        if self._checker is not None:
            self._checker.start()

    def close(self) -> None:
        if self._checker is not None:
            self._checker.stop()
        self.pool.close()

    # -- the call ---------------------------------------------------------------

    def _pick(self, request: Request, tried: list[Endpoint]) -> Endpoint | None:
        outlier = self.outlier
        if outlier is not None and self._now() >= outlier.next_return:
            outlier.expire()  # rebuilds the sets when an endpoint returns
        candidates = self._preferred
        if tried and candidates is not self._healthy and all(e in tried for e in candidates):
            candidates = self._healthy  # every local endpoint failed this call: go across zones
        key = request.header(self._hash_header) if self._hash_header else None
        return self.balancer.pick(candidates, self.active, tried, key)

    async def forward(
        self, request: Request, authority: bytes, path: bytes, avoid: list[Endpoint] | None = None
    ) -> tuple[Response, Endpoint]:
        """Send the call to an endpoint (one not in `avoid` when there is one).

        Endpoints count as active from the send until the response head arrives, which
        is what least-request balances on. The steps of each try are begin(), then
        failed() or answered(), which the proxy's callback path drives the same way.
        """
        tried: list[Endpoint] = list(avoid) if avoid else []
        first_try = len(tried)
        if not self.endpoints and not self._first_update.is_set():
            try:
                await asyncio.wait_for(self._first_update.wait(), FIRST_UPDATE_TIMEOUT)
            except TimeoutError:
                self._first_update.set()  # wait once per cluster, not once per call
        while True:
            endpoint = self.begin(request, tried)
            try:
                response = await self.pool.request(endpoint, request, authority, path)
            except MeshError as exc:
                if self.failed(endpoint, exc, request, tried, first_try):
                    continue
                raise
            except BaseException:
                self.release(endpoint)
                raise
            if self.answered(endpoint, response, request, tried, first_try):
                continue
            return response, endpoint

    def begin(self, request: Request, tried: list[Endpoint]) -> Endpoint:
        """Pick the endpoint for one try and count it active."""
        endpoint = self._pick(request, tried)
        if endpoint is None:
            if self.subset_name:
                raise NoHealthyUpstream(
                    f"subset {self.subset_name!r} of service {self.name!r} has no endpoint",
                    service=self.name,
                )
            raise NoHealthyUpstream(
                f"service {self.name!r} has no healthy endpoint", service=self.name
            )
        active = self.active
        active[endpoint] = active.get(endpoint, 0) + 1
        return endpoint

    def failed(
        self,
        endpoint: Endpoint,
        exc: MeshError,
        request: Request,
        tried: list[Endpoint],
        first_try: int,
    ) -> bool:
        """A try that ended in `exc`: True to send again (the peer never saw the call and
        the body can be replayed), False to give up with `exc`."""
        self.record(endpoint, exc)
        self.release(endpoint)
        if not isinstance(exc, RETRY_SAFE):
            return False
        tried.append(endpoint)
        return len(tried) - first_try <= MAX_SAFE_RESENDS and request.body.rewind()

    def answered(
        self,
        endpoint: Endpoint,
        response: Response,
        request: Request,
        tried: list[Endpoint],
        first_try: int,
    ) -> bool:
        """A try that got a response head: True to send again elsewhere (a peer sidecar
        said its app never saw the call), False to return `response`."""
        self.release(endpoint)
        self.record(endpoint, response.status)
        if (
            self._resend_unavailable
            and _peer_never_saw(response)
            and len(tried) - first_try < MAX_SAFE_RESENDS
            and len(self.endpoints) > 1
            and request.body.rewind()
        ):
            response.body.cancel()
            tried.append(endpoint)
            return True
        return False

    def release(self, endpoint: Endpoint) -> None:
        count = self.active.get(endpoint, 0) - 1
        if count > 0:
            self.active[endpoint] = count
        else:
            self.active.pop(endpoint, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "endpoints": [
                {
                    "address": e.address,
                    "zone": e.zone,
                    "instance_id": e.instance_id,
                    "meta": dict(sorted(e.meta)),
                    "health": self.health_of(e),
                    "active_requests": self.active.get(e, 0),
                    "pool": self.pool.snapshot(e),
                }
                for e in self.endpoints
            ],
            "balancer": type(self.balancer).__name__,
            "connections": self.pool.connection_count(),
            **(
                {
                    "subsets": {
                        name: [e.address for e in subset.endpoints]
                        for name, subset in sorted(self.subsets.items())
                    }
                }
                if self.subsets
                else {}
            ),
        }


class SubsetCluster(Cluster):
    """A subset of a service's endpoints (route rules' `subset`), selected by metadata.

    It shares its service's pool, outlier detection, health checks and active counts
    (an endpoint is one peer, however many subsets hold it) and has a balancer of its
    own; its endpoint sets are recomputed whenever the service's are.
    """

    def __init__(self, parent: Cluster, name: str, selector: frozenset[tuple[str, str]]) -> None:
        # Not Cluster.__init__: everything but the balancer and the sets is the parent's.
        self.name = parent.name
        self.subset_name = name
        self.selector = selector
        self.parent = parent
        self.pool = parent.pool
        self.balancer = type(parent.balancer)()
        self.endpoints = ()
        self.active = parent.active
        self._zone = parent._zone
        self._hash_header = parent._hash_header
        self._metrics = None  # the service's gauges are the parent's to set
        self._resend_unavailable = parent._resend_unavailable
        self._now = parent._now
        self.outlier = parent.outlier
        self.health = parent.health
        self._checker = None
        self._healthy = ()
        self._preferred = ()
        self._first_update = parent._first_update
        self.subsets = {}
        self.refresh()

    def refresh(self) -> None:
        selector = self.selector
        self.endpoints = tuple(e for e in self.parent.endpoints if selector <= e.meta)
        self._rebuild()

    def update(self, endpoints: tuple[Endpoint, ...]) -> None:
        raise TypeError("a subset's endpoints follow its service's")

    def start(self) -> None:
        """The service's checks cover the subset's endpoints."""

    def close(self) -> None:
        """The pool is the service's, closed with it."""
