"""The Consul backend: blocking-query watches through py-consul's `consul.aio` client.

Owns three things. The catalog watch (a blocking `/v1/catalog/services` query) keeps
`services()` complete, so routing by name knows every service. One health watch per
(service, datacenter), a blocking `/v1/health/service/<name>?passing` query, started
the first time a service is asked for and shared by every call after that; when a
service's own datacenter has no passing instance, the failover datacenters are
watched and the first with one serves. Self-registration with a TTL check that the
sidecar refreshes every `check_interval` from a probe of the app's health path (or
fails at once when the probe does), so callers' blocking queries return within about
a second of the app dying; deregistration on shutdown.

When Consul cannot be reached, every watch keeps serving what it last saw and retries
with a capped back-off; the outage is logged once and `opus_discovery_stale` says so.
Blocking-query rules (Consul's docs): reset the index when it goes backwards, keep it
>= 1, and rate-limit the loop (a token bucket, burst 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio

from sidecar.config import AppConfig, ConsulDiscoveryConfig
from sidecar.discovery.base import Discovery, Endpoint, Instance, endpoint_meta, same_endpoints
from sidecar.health import RegistryHealth, probe_app
from sidecar.metrics import Metrics

logger = logging.getLogger("sidecar.discovery.consul")

_T = TypeVar("_T")
# What a request to an unreachable or failing Consul raises.
_CONSUL_ERRORS = (consul.ConsulException, aiohttp.ClientError, OSError, TimeoutError)
# First back-off after a failed query; doubles up to `retry_max`.
_RETRY_FIRST = 0.1


class TokenBucket:
    """Allows `rate` acquisitions a second with bursts of `burst` (injected clock)."""

    def __init__(self, rate: float, burst: int = 2, now: Callable[[], float] = time.monotonic):
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._now = now
        self._last = now()

    def delay(self) -> float:
        """Take a token; returns how long to wait before using it (0: at once)."""
        now = self._now()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def acquire(self) -> None:
        wait = self.delay()
        if wait > 0:
            await asyncio.sleep(wait)


def next_index(previous: int, returned: object) -> int:
    """The index for the next blocking query, by Consul's rules: 0 (a fresh, non-blocking
    read) when the index went backwards, and never below 1 otherwise."""
    try:
        index = int(str(returned))
    except ValueError:
        return 0
    if index < previous:
        return 0
    return max(index, 1)


def parse_health(entries: object) -> tuple[Endpoint, ...]:
    """Endpoints from a /v1/health/service response (address: the service's, else the node's)."""
    endpoints: list[Endpoint] = []
    if not isinstance(entries, list):
        return ()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        host = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if not (isinstance(host, str) and host and isinstance(port, int) and 0 < port < 65536):
            continue
        meta = service.get("Meta") or {}
        weights = service.get("Weights") or {}
        weight = weights.get("Passing", 1) if isinstance(weights, dict) else 1
        zone = meta.get("zone", "") if isinstance(meta, dict) else ""
        endpoints.append(
            Endpoint(
                host=host,
                port=port,
                zone=zone if isinstance(zone, str) else "",
                weight=weight if isinstance(weight, int) and weight > 0 else 1,
                instance_id=str(service.get("ID") or ""),
                meta=endpoint_meta(meta, service.get("Tags")),
            )
        )
    return tuple(sorted(endpoints, key=lambda e: (e.host, e.port, e.instance_id)))


def _duration(seconds: float) -> str:
    # Consul durations are Go durations; whole milliseconds are exact enough.
    return f"{round(seconds * 1000)}ms"


@dataclass(slots=True)
class _Watch:
    service: str
    dc: str  # "": the agent's own datacenter
    endpoints: tuple[Endpoint, ...] | None = None  # None until the first answer
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def consul_client(address: str, token: str) -> consul.aio.Consul:
    """A `consul.aio.Consul` for `address` (empty: $CONSUL_HTTP_ADDR, else 127.0.0.1:8500)."""
    kwargs: dict[str, Any] = {}
    if address:
        parsed = urllib.parse.urlsplit(address if "//" in address else "//" + address)
        kwargs.update(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 8500,
            scheme=parsed.scheme or "http",
        )
    if token:
        kwargs["token"] = token
    # py-consul builds its aiohttp connector with arguments aiohttp has deprecated
    # (verify_ssl, ssl_context); the warnings are py-consul's, not ours to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return consul.aio.Consul(**kwargs)


class ConsulDiscovery(Discovery):
    def __init__(
        self,
        config: ConsulDiscoveryConfig,
        app: AppConfig,
        *,
        client_factory: Callable[[], consul.aio.Consul] | None = None,
    ) -> None:
        super().__init__()
        self._config = config
        self._app = app
        self._client_factory = client_factory or functools.partial(
            consul_client, config.address, config.token
        )
        self._client: consul.aio.Consul | None = None
        self._status = RegistryHealth("consul", logger)
        self._catalogs: dict[str, frozenset[str]] = {}
        self._configured = frozenset(config.watch) | frozenset(config.datacenters)
        self._services: frozenset[str] = self._configured
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._effective: dict[str, tuple[Endpoint, ...]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._instance: Instance | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._app_healthy: bool | None = None

    def bind_metrics(self, metrics: Metrics) -> None:
        self._status.bind(metrics)

    @property
    def stale(self) -> bool:
        return self._status.stale

    def _consul(self) -> consul.aio.Consul:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    async def _call(self, what: str, request: Awaitable[_T], timeout: float) -> _T:
        try:
            async with asyncio.timeout(timeout):
                result = await request
        except _CONSUL_ERRORS as exc:
            self._status.failed(what, exc)
            raise
        self._status.ok()
        return result

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        client = self._consul()
        # The local catalog, and the failover datacenters' (a service that only runs
        # there must still be routable by name).
        for dc in dict.fromkeys(("", *self._config.failover_datacenters)):
            index = 0
            try:
                index, services = await self._call(
                    "catalog read",
                    client.catalog.services(dc=dc or None),
                    self._config.request_timeout,
                )
            except _CONSUL_ERRORS:
                pass  # logged; the watch below keeps trying and routing starts when it answers
            else:
                self._set_catalog(dc, services)
                index = next_index(0, index)
            self._tasks.append(
                asyncio.create_task(
                    self._watch_catalog(dc, index), name=f"consul-catalog-{dc or 'local'}"
                )
            )
        if self._config.watch:
            # The first answer for every configured service, or what arrived in time.
            await asyncio.wait(
                [asyncio.create_task(self._first_answer(s)) for s in self._config.watch],
                timeout=self._config.request_timeout,
            )

    async def _first_answer(self, service: str) -> None:
        """Wait for the service's own dc, then (when it has nothing) for its failovers."""
        primary = self._ensure_watch(service, self._dc_of(service))
        await primary.synced.wait()
        if primary.endpoints:
            return
        for dc in self._config.failover_datacenters:
            failover = self._ensure_watch(service, dc)
            await failover.synced.wait()
            if failover.endpoints:
                return

    async def close(self) -> None:
        tasks = [*self._tasks, *(w.task for w in self._watches.values() if w.task)]
        if self._heartbeat is not None:
            tasks.append(self._heartbeat)
        self._tasks.clear()
        self._heartbeat = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- what calls read -------------------------------------------------------

    def services(self) -> frozenset[str]:
        return self._services

    def endpoints(self, service: str) -> tuple[Endpoint, ...] | None:
        found = self._effective.get(service)
        if found is not None:
            return found
        if service not in self._services:
            return None
        self._ensure_watch(service, self._dc_of(service))
        # Known but not watched until now: empty until the watch's first answer
        # (the cluster holds its first calls for it, see cluster.FIRST_UPDATE_TIMEOUT).
        return self._effective.setdefault(service, ())

    def _dc_of(self, service: str) -> str:
        return self._config.datacenters.get(service, "")

    def _set_catalog(self, dc: str, services: object) -> None:
        names = frozenset(services) if isinstance(services, Mapping) else frozenset()
        self._catalogs[dc] = names
        self._services = frozenset().union(
            *self._catalogs.values(), self._configured, self._effective
        )

    # -- watches ------------------------------------------------------------------

    def _ensure_watch(self, service: str, dc: str) -> _Watch:
        watch = self._watches.get((service, dc))
        if watch is None:
            watch = _Watch(service, dc)
            self._watches[(service, dc)] = watch
            watch.task = asyncio.get_running_loop().create_task(
                self._watch_health(watch), name=f"consul-watch-{service}@{dc or 'local'}"
            )
        return watch

    async def _blocking(
        self,
        what: str,
        query: Callable[[int, str | None], Awaitable[tuple[object, _T]]],
        on_result: Callable[[_T], None],
        index: int = 0,
    ) -> None:
        """The blocking-query loop shared by every watch."""
        config = self._config
        bucket = TokenBucket(config.max_queries_per_second)
        wait = _duration(config.wait)
        # Consul adds up to wait/16 of jitter; past that plus slack the agent is gone.
        timeout = config.wait * (1 + 1 / 16) + config.request_timeout
        backoff = _RETRY_FIRST
        while True:
            await bucket.acquire()
            try:
                returned, data = await self._call(
                    what,
                    query(index, wait if index else None),
                    timeout if index else config.request_timeout,
                )
            except _CONSUL_ERRORS:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, config.retry_max)
                continue
            backoff = _RETRY_FIRST
            index = next_index(index, returned)
            on_result(data)

    async def _watch_catalog(self, dc: str, index: int) -> None:
        client = self._consul()

        def query(index: int, wait: str | None) -> Awaitable[tuple[object, object]]:
            result: Awaitable[tuple[object, object]] = client.catalog.services(
                index=index or None, wait=wait, dc=dc or None
            )
            return result

        await self._blocking(
            "catalog watch", query, functools.partial(self._set_catalog, dc), index
        )

    async def _watch_health(self, watch: _Watch) -> None:
        client = self._consul()

        def query(index: int, wait: str | None) -> Awaitable[tuple[object, object]]:
            result: Awaitable[tuple[object, object]] = client.health.service(
                watch.service, index=index or None, wait=wait, passing=True, dc=watch.dc or None
            )
            return result

        def on_result(entries: object) -> None:
            watch.endpoints = parse_health(entries)
            watch.synced.set()
            self._refresh(watch.service)

        await self._blocking(f"health watch of {watch.service}", query, on_result)

    def _refresh(self, service: str) -> None:
        """Recompute what `service` routes to: its own dc, else the first failover dc
        with a passing instance; notify when that changed."""
        primary_dc = self._dc_of(service)
        primary = self._watches.get((service, primary_dc))
        if primary is None or primary.endpoints is None:
            return  # nothing known yet: keep what we had
        chosen = primary.endpoints
        if not chosen:
            for dc in self._config.failover_datacenters:
                if dc == primary_dc:
                    continue
                failover = self._ensure_watch(service, dc)
                if failover.endpoints:
                    chosen = failover.endpoints
                    break
        previous = self._effective.get(service)
        if same_endpoints(previous, chosen):
            return
        self._effective[service] = chosen
        if service not in self._services:
            self._services = self._services | {service}
        self._notify(service, chosen)

    # -- registration ------------------------------------------------------------

    def _check_id(self, instance: Instance) -> str:
        return f"service:{instance.instance_id}"

    async def register(self, instance: Instance) -> None:
        """Register now (an error here is raised), then keep the TTL check fresh."""
        if self._instance is not None:
            await self.deregister()
        healthy = await self._probe_app()
        await self._register(instance, healthy)
        self._instance = instance
        self._app_healthy = healthy
        self._heartbeat = asyncio.create_task(self._keep_checked(instance), name="consul-ttl")

    async def _register(self, instance: Instance, healthy: bool) -> None:
        config = self._config
        meta = {**instance.meta, "protocol": instance.protocol}
        if instance.zone:
            meta["zone"] = instance.zone
        check = {
            "CheckID": self._check_id(instance),
            "Name": f"{instance.service} app health (via opus sidecar)",
            "TTL": _duration(config.ttl),
            "Status": "passing" if healthy else "critical",
            "DeregisterCriticalServiceAfter": _duration(config.deregister_critical_after),
        }
        client = self._consul()
        ok = await self._call(
            "register",
            client.agent.service.register(
                instance.service,
                service_id=instance.instance_id,
                address=instance.host,
                port=instance.port,
                tags=list(instance.tags),
                meta=meta,
                check=check,
                replace_existing_checks=True,
            ),
            config.request_timeout,
        )
        if not ok:
            raise consul.ConsulException(f"registering {instance.instance_id} was refused")
        logger.info(
            "registered %s (%s) at %s:%d in Consul",
            instance.instance_id,
            instance.service,
            instance.host,
            instance.port,
        )

    async def deregister(self) -> None:
        instance, self._instance = self._instance, None
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])
        if instance is None:
            return
        client = self._consul()
        try:
            await self._call(
                "deregister",
                client.agent.service.deregister(instance.instance_id),
                self._config.request_timeout,
            )
        except _CONSUL_ERRORS:
            # Not fatal: the critical TTL check removes it after deregister_critical_after.
            logger.warning("could not deregister %s from Consul", instance.instance_id)
        else:
            logger.info("deregistered %s from Consul", instance.instance_id)

    async def _probe_app(self) -> bool:
        return await probe_app(self._app, self._config.check_timeout)

    async def _keep_checked(self, instance: Instance) -> None:
        check_id = self._check_id(instance)
        client = self._consul()
        while True:
            await asyncio.sleep(self._config.check_interval)
            healthy = await self._probe_app()
            if healthy != self._app_healthy:
                logger.warning(
                    "app health %s: marking %s %s in Consul",
                    "passes" if healthy else "fails",
                    instance.instance_id,
                    "passing" if healthy else "critical",
                )
            self._app_healthy = healthy
            note = "app healthy" if healthy else f"app health probe failed ({self._app.port})"
            update = client.agent.check.ttl_pass if healthy else client.agent.check.ttl_fail
            try:
                known = await self._call(
                    "check update",
                    update(check_id, notes=note),
                    self._config.request_timeout,
                )
                if not known:
                    # The agent lost our registration (restarted, or reaped a critical
                    # service): register again.
                    await self._register(instance, healthy)
            except consul.ConsulException:
                with contextlib.suppress(*_CONSUL_ERRORS):  # logged by _call; next round retries
                    await self._register(instance, healthy)
            except _CONSUL_ERRORS:
                pass  # logged once per outage by _call
