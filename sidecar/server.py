"""The sidecar process: builds every part from the config, runs it, drains it on SIGTERM.

Start order: discovery's first sync, then the listeners bind, then the local app
is registered (so peers only learn of us once we can take calls), then /ready.
Drain order (SIGTERM): /ready turns 503 and the instance leaves discovery, the
listeners stop accepting and send GOAWAY, in-flight calls get `drain_timeout`
to finish, then pools and discovery close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.accesslog import AccessLog
from sidecar.adapters.h2server import GOAWAY_GRACE_SECONDS
from sidecar.admin import AdminServer
from sidecar.call import BufferBudget
from sidecar.capture import CaptureListener
from sidecar.cluster import Cluster, ClusterManager, pool_limits
from sidecar.config import SidecarConfig, advertise_host, resolve_instance_id
from sidecar.discovery.base import Endpoint, Instance
from sidecar.discovery.factory import create_discovery
from sidecar.lb import RoundRobin
from sidecar.listener import Listener
from sidecar.metrics import WORKER_FOLD_SECONDS, Metrics
from sidecar.process import ControlledProcess, write_ports
from sidecar.proxy import CallHandler, InboundHandler, OutboundHandler, TlsInboundHandler
from sidecar.routing import Router
from sidecar.serving import Admission, ListenerContext
from sidecar.tls.setup import MeshTls
from sidecar.tracing import Tracing, from_env
from sidecar.upstream.h1pool import H1Pool
from sidecar.upstream.h2pool import H2Pool
from sidecar.upstream.pool import Pool
from sidecar.workers import supervise

log = logging.getLogger("sidecar.server")
# Young-generation threshold 50,000 allocations (CPython: 700): see _tune_gc().
GC_THRESHOLD = (50_000, 20, 20)


class Sidecar(ControlledProcess):
    def __init__(
        self, cfg: SidecarConfig, tracing: Tracing | None = None, worker: int | None = None
    ) -> None:
        super().__init__(cfg)
        self.worker = worker  # this process's index under a supervisor (--workers), or None
        self.tracing = tracing if tracing is not None else from_env(cfg.service.name)
        self.metrics = Metrics()
        self.metrics_registry: CollectorRegistry = self.metrics.registry
        self.discovery = create_discovery(cfg)
        # mTLS (tls.mode permissive or strict): the material, its source, the contexts.
        self.tls = MeshTls.from_config(cfg) if cfg.tls.mode != "disable" else None
        upstream_tls = self.tls.upstream() if self.tls is not None else None
        if upstream_tls is not None:
            refused = self.metrics.tls_refused
            upstream_tls.on_refuse = lambda reason: refused.labels("upstream", reason).inc()
        self.clusters = ClusterManager(cfg, self.discovery, self.metrics, upstream_tls)
        self.access_log = AccessLog(cfg.log.access_log)
        self.listeners: dict[str, Listener] = {}
        self.admission = Admission()  # its fd budget is set once everything else is open
        self.admin: AdminServer | None = None
        self.capture: CaptureListener | None = None
        self.app_cluster: Cluster | None = None
        self.ports: dict[str, int] = {}
        self.handlers: tuple[CallHandler, ...] = ()
        self._drain_task: asyncio.Task[None] | None = None

    # -- AdminState --
    def certs_snapshot(self) -> dict[str, Any]:
        if self.tls is None:
            return {"mode": "disable"}
        return self.tls.snapshot()

    def clusters_snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = {"outbound": self.clusters.snapshot()}
        if self.app_cluster is not None:
            snapshot["inbound"] = {self.cfg.service.name: self.app_cluster.snapshot()}
        return snapshot

    def begin_drain(self) -> None:
        """Stop taking calls (readiness 503, out of discovery, GOAWAY) but keep running:
        the preStop hook's step before SIGTERM."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_listeners())

    def set_log_level(self, level: str) -> None:
        logging.getLogger().setLevel(level)
        logging.getLogger("sidecar").setLevel(level)

    # -- lifecycle --
    async def start(self) -> dict[str, int]:
        cfg = self.cfg
        if self.worker is not None:  # the supervisor reads our multiprocess files, not /metrics
            self.metrics.fold_every(WORKER_FOLD_SECONDS, asyncio.get_running_loop().call_later)
        await self.discovery.start()
        app_endpoint = Endpoint(cfg.app.host, cfg.app.port, instance_id="app")
        app_limits = pool_limits(cfg, cfg.service.name)
        app_pool: Pool
        if cfg.app.protocol == "h2c":
            app_pool = H2Pool(cfg.service.name, app_limits, self.metrics)
        else:
            app_pool = H1Pool(
                cfg.service.name,
                # The app is one process on loopback: a deeper pool, quick idle close
                # (shorter than typical server keep-alives, so we rarely reuse a closed one).
                type(app_limits)(
                    max_connections=cfg.app.max_connections,
                    max_per_route=cfg.app.max_connections,
                    idle_timeout=min(app_limits.idle_timeout, 3.0),
                    connect_timeout=app_limits.connect_timeout,
                    pending_timeout=app_limits.pending_timeout,
                ),
                self.metrics,
                max_header_bytes=cfg.limits.max_header_bytes,
            )
        self.app_cluster = Cluster(cfg.service.name, app_pool, RoundRobin())
        self.app_cluster.update((app_endpoint,))
        router = Router(cfg.routes, self.clusters.knows)
        outbound = OutboundHandler(
            cfg, router, self.clusters, self.metrics, self.access_log, self.tracing
        )
        inbound_tls = None
        if self.tls is not None:
            self.tls.start(asyncio.get_running_loop())
            inbound_tls = self.tls.inbound("inbound")
            refused = self.metrics.tls_refused
            inbound_tls.on_refuse = lambda reason: refused.labels("inbound", reason).inc()
            self.tls.source.on_expired = self.metrics.tls_certificate_expired.inc
            inbound: InboundHandler = TlsInboundHandler(
                cfg, self.app_cluster, self.metrics, self.access_log, self.tracing, inbound_tls
            )
        else:
            inbound = InboundHandler(
                cfg, self.app_cluster, self.metrics, self.access_log, self.tracing
            )
        self.handlers = (outbound, inbound)
        budget = BufferBudget(
            cfg.filters.max_buffered_request_bytes, self.metrics.buffer_budget_refusals.inc
        )
        outbound.budget = inbound.budget = budget
        for name, handler, spec in (
            ("outbound", outbound, cfg.listeners.outbound),
            ("inbound", inbound, cfg.listeners.inbound),
        ):
            ctx = ListenerContext(
                name, handler, cfg.http2, cfg.limits, self.admission, start_now=handler.start_now
            )
            ctx.on_accept = self.metrics.downstream_connections.labels(name).inc
            ctx.on_refuse = self._refusal_counter(name)
            ctx.on_timeout = self._timeout_counter(name)
            listener = Listener(
                ctx,
                spec.host,
                spec.port,
                reuse_port=self.worker is not None,
                tls=inbound_tls if name == "inbound" else None,
            )
            self.ports[name] = await listener.start()
            self.listeners[name] = listener
        if cfg.listeners.capture.enabled:  # transparent interception (docs/transparent.md)
            self.capture = CaptureListener(cfg, outbound, self.clusters, self.metrics)
            self.capture.reuse_port = self.worker is not None
            self.ports["capture"] = await self.capture.start()
        self.admin = AdminServer(self, cfg.listeners.admin.host, cfg.listeners.admin.port)
        self.ports["admin"] = await self.admin.start()
        if cfg.discovery.register:
            await self.discovery.register(
                Instance(
                    service=cfg.service.name,
                    instance_id=resolve_instance_id(cfg),
                    host=advertise_host(cfg),
                    port=self.ports["inbound"],
                    zone=cfg.service.zone,
                    protocol=cfg.upstream.protocol,
                    tags=cfg.service.tags,
                    meta=dict(cfg.service.meta),
                )
            )
            self.discovery.refresh()
        # Overload: downstream accepts stop while the fds left would drop under the
        # reserve, so /ready, the heartbeat and pooled upstreams keep theirs.
        self.admission.fd_budget = Admission.from_rlimit(cfg.limits.fd_reserve).fd_budget
        _tune_gc()
        self.ready = True
        log.info(
            "opus-sidecar ready: service=%s outbound=%s:%d inbound=%s:%d admin=%s:%d app=%s:%d",
            cfg.service.name,
            cfg.listeners.outbound.host,
            self.ports["outbound"],
            cfg.listeners.inbound.host,
            self.ports["inbound"],
            cfg.listeners.admin.host,
            self.ports["admin"],
            cfg.app.host,
            cfg.app.port,
        )
        return self.ports

    def _refusal_counter(self, listener: str) -> Callable[[str], None]:
        family = self.metrics.downstream_refused
        return lambda limit: family.labels(listener, limit).inc()

    def _timeout_counter(self, listener: str) -> Callable[[str], None]:
        family = self.metrics.downstream_timeouts
        return lambda timeout: family.labels(listener, timeout).inc()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def _drain_listeners(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.ready = False
        log.info("draining: leaving discovery, refusing new calls")
        with contextlib.suppress(Exception):
            await self.discovery.deregister()
        for listener in self.listeners.values():
            listener.begin_drain()
        if self.capture is not None:
            self.capture.begin_drain()

    async def drain(self) -> None:
        """Graceful shutdown; returns when in-flight calls are done or drain_timeout passed."""
        await self._drain_listeners()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout
        finished = True
        for listener in self.listeners.values():
            finished &= await listener.wait_idle(max(0.0, deadline - loop.time()))
        if self.capture is not None:  # captured calls and passthrough relays, same deadline
            finished &= await self.capture.wait_idle(max(0.0, deadline - loop.time()))
        if not finished:
            log.warning("drain_timeout (%ss) passed with calls in flight", self.cfg.drain_timeout)
        # Idle HTTP/2 connections close themselves a moment after their GOAWAY (so a
        # stream the peer opened meanwhile is refused, not lost): give them that moment.
        capture = self.capture
        if any(lst.ctx.connections for lst in self.listeners.values()) or (
            capture is not None and capture.has_connections()
        ):
            await asyncio.sleep(GOAWAY_GRACE_SECONDS + 0.1)
        await self.close()

    async def close(self) -> None:
        if self.capture is not None:
            await self.capture.close()
        for listener in self.listeners.values():
            await listener.close()
        for handler in self.handlers:
            handler.close()
        self.clusters.close()
        if self.app_cluster is not None:
            self.app_cluster.pool.close()
        if self.admin is not None:
            await self.admin.close()
        await self.discovery.close()
        if self.tls is not None:
            self.tls.close()
        self.access_log.close()
        self.tracing.shutdown()
        self.metrics.close()  # a worker's last figures, for the supervisor


def raise_fd_limit() -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (as Go's runtime does): the
    soft default (often 1024) is a historical select() limit, not a budget."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(
    cfg: SidecarConfig, ports_file: str | None = None, worker: int | None = None
) -> int:
    raise_fd_limit()
    sidecar = Sidecar(cfg, worker=worker)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, sidecar.quit)
    try:
        ports = await sidecar.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await sidecar.close()
        return 1
    if ports_file:
        write_ports(ports_file, ports)
    await sidecar.wait_for_stop()
    await sidecar.drain()
    log.info("stopped")
    return 0


def _tune_gc() -> None:
    """Move what start-up built (modules, config, the loop) out of the collector's sight
    and collect the young generation less often: a call allocates a few dozen short-lived
    objects, almost none of them in cycles, and every collection pass is a pause on the
    data path."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def run_sidecar(
    cfg: SidecarConfig,
    *,
    ports_file: str | None = None,
    config_path: str | None = None,
    worker: int | None = None,
) -> int:
    if cfg.workers > 1 and worker is None:
        return supervise(cfg, config_path, ports_file)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(serve(cfg, ports_file, worker))
    return uvloop.run(serve(cfg, ports_file, worker))
