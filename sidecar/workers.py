"""`workers: N` (or `run --workers N`): N worker processes, each a whole sidecar with its
own event loop, sharing the data ports through SO_REUSEPORT, under one supervisor.

The supervisor reserves the data ports (bound with SO_REUSEPORT but never listening, so
the kernel hands connections only to the workers' listening sockets and a port 0 config
still gives every worker the same port), starts the workers with their config plus
overrides (admin on an internal loopback port, only worker 0 registering the app), and
serves the admin port itself: /metrics and /stats sum the workers' metrics through
prometheus-client's multiprocess mode (a worker's per-call counts reach its files within
WORKER_FOLD_SECONDS, see sidecar/metrics.py), /ready is 200 when every worker is ready,
/clusters shows each worker's view, and state changes are passed on to every worker.
A worker that dies is restarted; SIGTERM drains every worker, then the supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import multiprocess as prom_multiprocess

from filters.hmac_replay import SHARED_DIR_ENV
from sidecar.admin import AdminServer
from sidecar.config import SidecarConfig
from sidecar.config.live import ReloadPlan, plan_reload
from sidecar.config.yamlfile import read_bytes
from sidecar.metrics import config_reloads_counter
from sidecar.process import ControlledProcess, read_port, write_ports
from sidecar.reload import LiveConfig, ReloadRefused

log = logging.getLogger("sidecar.workers")

MAX_RESTARTS = 10  # a worker that keeps dying is a config or host problem, not bad luck


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ports_file: str
    admin_port: int = 0
    ready: bool = False


# prometheus-client's multiprocess helpers are unannotated; pin their signatures here.
_multiprocess_collector = cast(
    Callable[[CollectorRegistry, str], object], prom_multiprocess.MultiProcessCollector
)
_mark_dead = cast(Callable[[int, str], None], prom_multiprocess.mark_process_dead)


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor(ControlledProcess):
    def __init__(self, cfg: SidecarConfig, config_path: str | None, ports_file: str | None):
        super().__init__(cfg)
        self.config_path = config_path
        self.ports_file = ports_file
        self.workers: list[_Worker] = []
        self.restarts = 0
        self._snapshots: dict[int, Any] = {}
        self.dir = tempfile.mkdtemp(prefix="opus-sidecar-workers-")
        self.metrics_dir = os.path.join(self.dir, "metrics")
        os.mkdir(self.metrics_dir)
        # hmac_verify's replay tables, one file each, shared by every worker (a replay
        # to another worker is a replay too).
        self.replay_dir = os.path.join(self.dir, "replay")
        os.mkdir(self.replay_dir)
        self.metrics_registry = CollectorRegistry()
        _multiprocess_collector(self.metrics_registry, self.metrics_dir)
        ProcessCollector(registry=self.metrics_registry)  # the supervisor's own process
        self.reloads = config_reloads_counter(self.metrics_registry)
        # The config the workers run: a copy of the last file accepted, so a worker
        # started (or restarted) later runs it, not a file a reload refused.
        self.worker_config = os.path.join(self.dir, "config.yaml")
        self._reserved: dict[str, socket.socket] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- AdminState --
    def certs_snapshot(self) -> dict[str, Any]:
        # Each worker issues or loads its own material: its own admin port shows it.
        return {
            "mode": self.cfg.tls.mode,
            "workers": [
                {"index": w.index, "certs": f"http://127.0.0.1:{w.admin_port}/certs"}
                for w in self.workers
            ],
        }

    def clusters_snapshot(self) -> dict[str, Any]:
        return {
            "workers": [
                {
                    "index": w.index,
                    "pid": w.proc.pid,
                    "admin": f"127.0.0.1:{w.admin_port}",
                    "ready": w.ready,
                    "clusters": self._snapshots.get(w.index, {}),
                }
                for w in self.workers
            ]
        }

    def begin_drain(self) -> None:
        self.draining = True
        self._tell_workers("POST", "/drain")

    def set_log_level(self, level: str) -> None:
        logging.getLogger().setLevel(level)
        self._tell_workers("POST", f"/logging?level={level}")

    def _tell_workers(self, method: str, path: str) -> None:
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if worker.admin_port:
                task = loop.create_task(self._request(worker, method, path))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _request(self, worker: _Worker, method: str, path: str) -> Any:
        assert self._session is not None
        url = f"http://127.0.0.1:{worker.admin_port}{path}"
        try:
            async with self._session.request(method, url) as resp:
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("worker %d %s %s: %s", worker.index, method, path, exc)
            return None

    async def _apply(self, new: SidecarConfig, plan: ReloadPlan) -> dict[str, Any]:
        """Hand the checked file to every worker: its copy is replaced, then each worker
        is told to reload it (a worker not yet up starts from the copy)."""
        assert self.config_path is not None
        _write_whole(self.worker_config, read_bytes(self.config_path))
        running = [w for w in self.workers if w.admin_port]
        answers = await asyncio.gather(
            *(self._request(w, "POST", "/config/reload") for w in running)
        )
        results = {
            str(w.index): a if isinstance(a, dict) else {"result": "unreachable"}
            for w, a in zip(running, answers, strict=True)
        }
        failed = [
            f"worker {i}: {r.get('error', r['result'])}"
            for i, r in results.items()
            if r.get("result") != "ok"
        ]
        if failed:
            raise ReloadRefused("; ".join(failed))
        self.cfg = new
        return {"workers": results}

    # -- workers --
    def _env(self, index: int) -> dict[str, str]:
        cfg = self.cfg
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env[SHARED_DIR_ENV] = self.replay_dir
        env["OPUS_WORKERS"] = "1"
        env["OPUS_LISTENERS_OUTBOUND_PORT"] = str(self._port("outbound"))
        env["OPUS_LISTENERS_INBOUND_PORT"] = str(self._port("inbound"))
        if "capture" in self._reserved:
            env["OPUS_LISTENERS_CAPTURE_PORT"] = str(self._port("capture"))
        env["OPUS_LISTENERS_ADMIN_HOST"] = "127.0.0.1"
        env["OPUS_LISTENERS_ADMIN_PORT"] = "0"
        if index > 0 or not cfg.discovery.register:
            env["OPUS_DISCOVERY_REGISTER"] = "false"  # one instance per pod: worker 0's
        return env

    def _port(self, name: str) -> int:
        port: int = self._reserved[name].getsockname()[1]
        return port

    def _spawn(self, index: int) -> _Worker:
        ports_file = os.path.join(self.dir, f"worker-{index}.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ports_file)
        argv = [sys.executable, "-m", "sidecar", "run", "--worker-index", str(index)]
        if self.config_path:
            argv += ["--config", self.worker_config]
        argv += ["--ports-file", ports_file]
        proc = subprocess.Popen(argv, env=self._env(index))
        log.info("worker %d started (pid %d)", index, proc.pid)
        return _Worker(index, proc, ports_file)

    async def _watch(self) -> None:
        """Readiness, restarts and cluster snapshots, twice a second."""
        while not self._stop.is_set():
            for i, worker in enumerate(self.workers):
                code = worker.proc.poll()
                if code is not None:
                    _mark_dead(worker.proc.pid, self.metrics_dir)
                    if self.restarts >= MAX_RESTARTS:
                        log.error("worker %d exited (%s); restart limit reached", i, code)
                        self._stop.set()
                        break
                    self.restarts += 1
                    log.warning("worker %d exited with %s: restarting it", i, code)
                    self.workers[i] = worker = self._spawn(i)
                if not worker.admin_port:
                    worker.admin_port = read_port(worker.ports_file, "admin")
                if worker.admin_port:
                    snapshot = await self._request(worker, "GET", "/clusters")
                    worker.ready = snapshot is not None
                    if snapshot is not None:
                        self._snapshots[worker.index] = snapshot
            was_ready = self.ready
            self.ready = bool(self.workers) and all(w.ready for w in self.workers)
            if self.ready and not was_ready and self.ports_file:
                write_ports(self.ports_file, self.ports())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    def ports(self) -> dict[str, int]:
        ports = {name: self._port(name) for name in self._reserved}
        ports["admin"] = self.admin_port
        ports["workers"] = len(self.workers)
        return ports

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.quit)
        listeners: list[tuple[str, Any]] = [
            ("outbound", cfg.listeners.outbound),
            ("inbound", cfg.listeners.inbound),
        ]
        if cfg.listeners.capture.enabled:
            listeners.append(("capture", cfg.listeners.capture))
        try:
            for name, spec in listeners:
                self._reserved[name] = _reserve(spec.host, spec.port)
        except OSError as exc:
            log.error("cannot reserve the listeners' ports: %s", exc)
            return 1
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        admin = AdminServer(self, cfg.listeners.admin.host, cfg.listeners.admin.port)
        self.live = LiveConfig(
            self.config_path,
            lambda: self.cfg,
            lambda new: plan_reload(self.cfg, new, workers=True),
            self._apply,
            lambda result: self.reloads.labels(result).inc(),
        )
        if self.config_path:
            _write_whole(self.worker_config, read_bytes(self.config_path))
        try:
            self.admin_port = await admin.start()
            self.workers = [self._spawn(i) for i in range(cfg.workers)]
            log.info("supervising %d workers; admin on port %d", cfg.workers, self.admin_port)
            self.live.start(watch=True)
            await self._watch()
            await self._stop_workers()
        finally:
            self.live.close()
            await admin.close()
            await self._session.close()
            for sock in self._reserved.values():
                sock.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        return 0

    async def _stop_workers(self) -> None:
        self.draining = True
        self.ready = False
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout + 5
        for worker in self.workers:
            try:
                await asyncio.to_thread(worker.proc.wait, max(deadline - loop.time(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time: killing it", worker.index)
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait)
            _mark_dead(worker.proc.pid, self.metrics_dir)
        log.info("workers stopped")


def supervise(cfg: SidecarConfig, config_path: str | None, ports_file: str | None) -> int:
    supervisor = Supervisor(cfg, config_path, ports_file)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(supervisor.run())
    return uvloop.run(supervisor.run())


def _write_whole(path: str, data: bytes) -> None:
    """Written beside, then renamed over: a worker reading it sees one version whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
