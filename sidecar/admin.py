"""The admin server: liveness, readiness, metrics and cluster state over HTTP.

Read-only routes answer every caller, because kubelet probes and Prometheus
scrape from the pod IP. Routes that change state answer loopback callers only:
anything else on the pod network must not be able to drain the sidecar.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

logger = logging.getLogger("sidecar.admin")

# prometheus_client leaves the OpenMetrics writer unannotated; pin its signature here.
_openmetrics_latest = cast(Callable[[CollectorRegistry], bytes], openmetrics.generate_latest)

_JSON = "application/json"
# Probes hit these many times a minute; build the bodies once.
_UP = b'{"status":"UP"}'
_READY = b'{"status":"READY"}'
_NOT_READY = b'{"status":"NOT_READY"}'
_DRAINING = b'{"status":"DRAINING"}'

# GET and HEAD cannot change state; every other method is guarded.
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class AdminState(Protocol):
    """What the admin server reads from (and, on /drain, tells) the running sidecar."""

    # Listeners bound and the first discovery sync done.
    ready: bool
    draining: bool
    metrics_registry: CollectorRegistry

    def clusters_snapshot(self) -> dict[str, Any]:
        """JSON-able view of clusters and their endpoints."""
        ...

    def begin_drain(self) -> None:
        """Stop taking new work; readiness turns to DRAINING."""
        ...

    def quit(self) -> None:
        """Drain, then exit."""
        ...

    def config_dump(self) -> dict[str, Any]:
        """The effective config, secrets redacted."""
        ...

    def certs_snapshot(self) -> dict[str, Any]:
        """mTLS: the sidecar's certificate and the trust bundle's roots (Envoy's /certs)."""
        ...

    def set_log_level(self, level: str) -> None: ...

    async def reload_config(self, trigger: str) -> dict[str, Any]:
        """Re-read the config file and apply it live (sidecar/reload.py)."""
        ...


def is_loopback(addr: str | None) -> bool:
    """Whether a peer address (as `request.remote` gives it) is this host's loopback.

    None or an unparsable address (a Unix socket peer, say) is not loopback:
    the guard fails closed.
    """
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    # A dual-stack socket reports IPv4 peers as ::ffff:127.x.y.z.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _json_response(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=_JSON)


@web.middleware
async def loopback_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer 403 to state-changing requests that do not come from loopback."""
    if request.method not in _SAFE_METHODS and not is_loopback(request.remote):
        logger.warning(
            "refused %s %s from non-loopback %s", request.method, request.path, request.remote
        )
        return _json_response(
            403, {"error": f"admin endpoint {request.path} only answers loopback callers"}
        )
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render aiohttp's HTTP errors (404, 405) as JSON like every other admin reply."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_response(exc.status, {"error": exc.reason})


class AdminServer:
    def __init__(self, state: AdminState, host: str, port: int) -> None:
        self._state = state
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    def _make_app(self) -> web.Application:
        # json_errors is outermost so the guard's own replies and the handlers'
        # errors all leave as JSON.
        app = web.Application(middlewares=[json_errors, loopback_guard])
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/clusters", self._clusters)
        app.router.add_get("/config_dump", self._config_dump)
        app.router.add_get("/certs", self._certs)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/debug/tasks", self._tasks)
        app.router.add_post("/drain", self._drain)
        app.router.add_post("/logging", self._logging)
        app.router.add_post("/quitquitquit", self._quit)
        app.router.add_post("/config/reload", self._reload)
        return app

    async def start(self) -> int:
        """Bind and serve; return the bound port (useful when `port` was 0)."""
        # The data path writes its own access log; aiohttp's would double it.
        runner = web.AppRunner(self._make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port: int = runner.addresses[0][1]
        logger.info("admin server listening on %s:%d", self._host, port)
        return port

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        # Liveness: the process answers, whatever it is doing (draining included).
        return web.Response(body=_UP, content_type=_JSON)

    async def _ready(self, request: web.Request) -> web.Response:
        state = self._state
        if state.draining:
            return web.Response(status=503, body=_DRAINING, content_type=_JSON)
        if not state.ready:
            return web.Response(status=503, body=_NOT_READY, content_type=_JSON)
        return web.Response(body=_READY, content_type=_JSON)

    async def _metrics(self, request: web.Request) -> web.Response:
        registry = self._state.metrics_registry
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            body = _openmetrics_latest(registry)
            content_type = openmetrics.CONTENT_TYPE_LATEST
        else:
            body = generate_latest(registry)
            content_type = CONTENT_TYPE_LATEST
        # The content type carries version and charset parameters, which
        # Response(content_type=...) refuses, so it goes in as a raw header.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _clusters(self, request: web.Request) -> web.Response:
        text = json.dumps(self._state.clusters_snapshot(), indent=2, sort_keys=True)
        return web.Response(body=text.encode(), content_type=_JSON)

    async def _drain(self, request: web.Request) -> web.Response:
        logger.info("drain requested over the admin API from %s", request.remote)
        self._state.begin_drain()
        return web.Response(body=_DRAINING, content_type=_JSON)

    async def _config_dump(self, request: web.Request) -> web.Response:
        text = json.dumps(self._state.config_dump(), indent=2, sort_keys=True)
        return web.Response(body=text.encode(), content_type=_JSON)

    async def _certs(self, request: web.Request) -> web.Response:
        text = json.dumps(self._state.certs_snapshot(), indent=2, sort_keys=True)
        return web.Response(body=text.encode(), content_type=_JSON)

    async def _stats(self, request: web.Request) -> web.Response:
        """Every metric sample as JSON: {name: [{"labels": {...}, "value": v}, ...]}.
        `?filter=prefix` keeps the names that start with it (given more than once, with
        any of them)."""
        prefixes = tuple(request.query.getall("filter", ())) or ("",)
        return web.Response(
            body=json.dumps(stats_snapshot(self._state.metrics_registry, prefixes)).encode(),
            content_type=_JSON,
        )

    async def _tasks(self, request: web.Request) -> web.Response:
        """asyncio tasks alive in this process (leak checks after faults)."""
        return _json_response(200, {"tasks": len(asyncio.all_tasks())})

    async def _logging(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "").upper()
        if level not in _LEVELS:
            return _json_response(
                400, {"error": f"query parameter 'level' must be one of {', '.join(_LEVELS)}"}
            )
        self._state.set_log_level(level)
        logger.warning("log level set to %s over the admin API", level)
        return _json_response(200, {"level": level})

    async def _quit(self, request: web.Request) -> web.Response:
        logger.info("quitquitquit from %s: draining, then exiting", request.remote)
        self._state.quit()
        return _json_response(200, {"status": "QUITTING"})

    async def _reload(self, request: web.Request) -> web.Response:
        result = await self._state.reload_config("admin")
        return _json_response(_RELOAD_STATUS.get(result["result"], 500), result)


# ok; invalid: the file did not parse or validate; refused: it asks for a restart.
_RELOAD_STATUS = {"ok": 200, "invalid": 422, "refused": 409}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def stats_snapshot(
    registry: CollectorRegistry, prefix: str | tuple[str, ...] = ""
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.name.endswith("_created"):
                out.setdefault(sample.name, []).append(
                    {"labels": sample.labels, "value": sample.value}
                )
    return out
