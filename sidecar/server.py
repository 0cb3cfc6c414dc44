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
from sidecar.callhandler import CallHandler
from sidecar.capture import CaptureListener
from sidecar.cluster import Cluster
from sidecar.clusters import ClusterManager, pool_limits
from sidecar.config import SidecarConfig, advertise_host, resolve_instance_id
from sidecar.config.live import ReloadPlan, plan_reload
from sidecar.discovery.base import Endpoint, Instance
from sidecar.discovery.factory import create_discovery
from sidecar.inbound import InboundHandler, TlsInboundHandler
from sidecar.intentions import Intentions, consul_intentions
from sidecar.lb import RoundRobin
from sidecar.listener import Listener
from sidecar.metrics import WORKER_FOLD_SECONDS, Metrics
from sidecar.process import ControlledProcess, write_ports
from sidecar.proxy import OutboundHandler
from sidecar.reload import LiveConfig, ReloadRefused
from sidecar.routing import Router
from sidecar.serving import Admission, ListenerContext
from sidecar.tls.inbound import InboundTls
from sidecar.tls.material import MaterialError
from sidecar.tls.setup import MeshTls
from sidecar.tracing import Tracing, from_env
from sidecar.upstream.h1pool import H1Pool
from sidecar.upstream.h2pool import H2Pool
from sidecar.upstream.pool import Pool
from sidecar.workers import supervise

log = logging.getLogger("sidecar.server")
# Young-generation threshold 50,000 allocations (CPython: 700): see _tune_gc().
GC_THRESHOLD = (50_000, 20, 20)
# How often a reload's replaced clusters are checked for calls still in flight.
RETIRE_POLL_SECONDS = 0.1


class Sidecar(ControlledProcess):
    def __init__(
        self,
        cfg: SidecarConfig,
        tracing: Tracing | None = None,
        worker: int | None = None,
        config_path: str | None = None,
        ports_file: str | None = None,
    ) -> None:
        super().__init__(cfg)
        self.worker = worker  # this process's index under a supervisor (--workers), or None
        self.config_path = config_path  # what a reload re-reads
        self.ports_file = ports_file
        self.tracing = tracing if tracing is not None else from_env(cfg.service.name)
        self.metrics = Metrics()
        self.metrics_registry: CollectorRegistry = self.metrics.registry
        self.discovery = create_discovery(cfg)
        # mTLS (tls.mode permissive or strict): the material, its source, the contexts.
        self.tls = MeshTls.from_config(cfg) if cfg.tls.mode != "disable" else None
        self.inbound_tls: InboundTls | None = None  # the inbound listener's, once started
        # Consul intentions deciding inbound calls (authorization.intentions), once started.
        self.intentions: Intentions | None = None
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
        self.budget = BufferBudget(
            cfg.filters.max_buffered_request_bytes, self.metrics.buffer_budget_refusals.inc
        )
        # Handlers and clusters a reload replaced, closed once their calls are done.
        self._retiring: list[tuple[tuple[CallHandler, ...], list[Cluster]]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

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
        if self.tls is not None:
            self.tls.start(asyncio.get_running_loop())
            tls_in = self.inbound_tls = self.tls.inbound("inbound")
            refused = self.metrics.tls_refused
            tls_in.on_refuse = lambda reason: refused.labels("inbound", reason).inc()
            self.tls.source.on_expired = self.metrics.tls_certificate_expired.inc
            self.tls.source.on_failure = self.metrics.tls_source_errors.labels(
                self.tls.source.name
            ).inc
        inbound_tls = self.inbound_tls
        if cfg.authorization.intentions.source == "consul":
            self.intentions = consul_intentions(cfg, self.metrics.authz_intentions_errors)
        outbound, inbound = self.handlers = self._build_handlers(cfg)
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
            await self.discovery.register(self._instance())
            self.discovery.refresh()
        # Overload: downstream accepts stop while the fds left would drop under the
        # reserve, so /ready, the heartbeat and pooled upstreams keep theirs.
        self.admission.fd_budget = Admission.from_rlimit(cfg.limits.fd_reserve).fd_budget
        # Under a supervisor, the supervisor watches the file and tells every worker.
        self.live = LiveConfig(
            self.config_path,
            lambda: self.cfg,
            self._plan,
            self._apply,
            None if self.worker is not None else self._count_reload,
        )
        self.live.start(watch=self.worker is None, sighup=self.worker is None)
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

    def _build_handlers(
        self, cfg: SidecarConfig, running: InboundHandler | None = None
    ) -> tuple[OutboundHandler, InboundHandler]:
        """The handlers for `cfg`; given the `running` inbound handler and an unchanged
        filters.inbound, the new one keeps its chain (and the filters' state)."""
        assert self.app_cluster is not None
        router = Router(cfg.routes, self.clusters.knows)
        outbound = OutboundHandler(
            cfg, router, self.clusters, self.metrics, self.access_log, self.tracing
        )
        keep = (
            running
            if running is not None and running.cfg.filters.inbound == cfg.filters.inbound
            else None
        )
        inbound: InboundHandler
        if self.inbound_tls is not None:
            inbound = TlsInboundHandler(
                cfg,
                self.app_cluster,
                self.metrics,
                self.access_log,
                self.tracing,
                self.inbound_tls,
                keep_chain_of=keep,
                intentions=self.intentions,
            )
        else:
            inbound = InboundHandler(
                cfg,
                self.app_cluster,
                self.metrics,
                self.access_log,
                self.tracing,
                keep_chain_of=keep,
            )
        outbound.budget = inbound.budget = self.budget
        return outbound, inbound

    def _instance(self) -> Instance:
        cfg = self.cfg
        return Instance(
            service=cfg.service.name,
            instance_id=resolve_instance_id(cfg),
            host=advertise_host(cfg),
            port=self.ports["inbound"],
            zone=cfg.service.zone,
            protocol=cfg.upstream.protocol,
            tags=cfg.service.tags,
            meta=dict(cfg.service.meta),
        )

    # -- live configuration (sidecar/reload.py) --
    def _count_reload(self, result: str) -> None:
        self.metrics.config_reloads.labels(result).inc()

    def _plan(self, new: SidecarConfig) -> ReloadPlan:
        return plan_reload(self.cfg, new, self.clusters.clusters, workers=self.worker is not None)

    async def _apply(self, new: SidecarConfig, plan: ReloadPlan) -> dict[str, Any]:
        """Switch to `new`. What can fail (binding a new address, building the inbound
        chain) is done first; then, with no await in between, the clusters, handlers and
        listener contexts are swapped, so every new call takes the new config and every
        call in flight finishes under the one it started with."""
        if self.draining:
            raise ReloadRefused("the sidecar is draining")
        servers: dict[str, asyncio.Server] = {}
        try:
            for name in plan.rebind:
                spec = getattr(new.listeners, name)
                try:
                    servers[name] = await self.listeners[name].bind(spec.host, spec.port)
                except OSError as exc:
                    raise ReloadRefused(
                        f"config key 'listeners.{name}': cannot bind {spec.host}:{spec.port}: "
                        f"{exc.strerror or exc}"
                    ) from None
            running = self.handlers[1]
            assert isinstance(running, InboundHandler)
            try:
                handlers = self._build_handlers(new, running)
            except Exception as exc:  # a filter that validated but would not build
                raise ReloadRefused(f"building the filter chains: {exc}") from None
        except ReloadRefused:
            for server in servers.values():
                server.close()
            raise
        # -- the swap: no await from here to the end of it --
        outbound, inbound = handlers
        if self.tls is not None:
            self.tls.reconfigure(new)  # before the clusters: new connections verify by it
        retired = self.clusters.reconfigure(new)
        self.budget.capacity = new.filters.max_buffered_request_bytes
        for name, handler in (("outbound", outbound), ("inbound", inbound)):
            listener = self.listeners[name]
            listener.ctx.reconfigure(handler, handler.start_now, new.http2, new.limits)
            if name in servers:
                spec = getattr(new.listeners, name)
                self.ports[name] = listener.rebind(servers[name], spec.host, spec.port)
        if self.capture is not None:  # its own keys cannot change; http2 and limits can
            self.capture.cfg, self.capture.outbound = new, outbound
        old_handlers, self.handlers = self.handlers, handlers
        old_level = self.cfg.log.level
        self.cfg = new
        # -- end of the swap --
        if new.log.level != old_level:
            self.set_log_level(new.log.level)
        self._retire(old_handlers, retired)
        if servers:
            log.info("rebound %s", ", ".join(f"{n} to port {self.ports[n]}" for n in servers))
            if self.ports_file:
                write_ports(self.ports_file, self.ports)
            if "inbound" in servers and new.discovery.register:
                with contextlib.suppress(Exception):
                    await self.discovery.deregister()
                await self.discovery.register(self._instance())
        return {
            "rebound": {name: self.ports[name] for name in servers},
            "clusters_replaced": sorted(c.name for c in retired),
        }

    def _retire(self, handlers: tuple[CallHandler, ...], clusters: list[Cluster]) -> None:
        entry = (handlers, clusters)
        self._retiring.append(entry)
        task = asyncio.get_running_loop().create_task(self._close_when_done(entry))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_when_done(self, entry: tuple[tuple[CallHandler, ...], list[Cluster]]) -> None:
        """Close what a reload replaced once the calls that started on it are done: a
        replaced cluster counts its calls in flight; a handler's calls are bounded by the
        listeners' calls in flight, and by drain_timeout, as at shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout
        handlers, clusters = entry
        while loop.time() < deadline:
            busy = any(any(c.active.values()) for c in clusters) or (
                handlers and any(lst.ctx.in_flight for lst in self.listeners.values())
            )
            if not busy:
                break
            await asyncio.sleep(RETIRE_POLL_SECONDS)
        self._close_retired(entry)

    def _close_retired(self, entry: tuple[tuple[CallHandler, ...], list[Cluster]]) -> None:
        if entry in self._retiring:
            self._retiring.remove(entry)
            handlers, clusters = entry
            for handler in handlers:
                handler.close()
            for cluster in clusters:
                cluster.close()

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
        if self.live is not None:
            self.live.close()
        for entry in list(self._retiring):
            self._close_retired(entry)
        for task in self._background:
            task.cancel()
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
        if self.intentions is not None:
            await self.intentions.close()
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
    cfg: SidecarConfig,
    ports_file: str | None = None,
    worker: int | None = None,
    config_path: str | None = None,
) -> int:
    raise_fd_limit()
    try:
        sidecar = Sidecar(cfg, worker=worker, config_path=config_path, ports_file=ports_file)
    except MaterialError as exc:  # the first certificate could not be had (Vault down, say)
        log.error("cannot start: tls.source %s: %s", cfg.tls.source, exc)
        return 1
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
        return asyncio.run(serve(cfg, ports_file, worker, config_path))
    return uvloop.run(serve(cfg, ports_file, worker, config_path))
