"""The Nacos backend: the HTTP Open API spoken directly over aiohttp.

v2 paths (`/nacos/v2/ns/...`, Nacos 2.2+) first; a 404 on them means a 1.x server,
and the client switches to the v1 paths for good. Ephemeral instances: registered
once, then kept alive by beats (`beat_interval`, default 5 s as Nacos's own clients);
Nacos marks an instance unhealthy after 15 s without a beat and removes it after 30 s.
To leave callers' rotation faster than that when the app dies, the sidecar probes the
app every second (or every beat, if beats are faster) and deregisters the instance
while the probe fails, registering it again when it passes.

Nacos has no push over HTTP, so the healthy instances of each service are polled
(`instance/list?healthyOnly=true`, every `poll_interval`), one poll loop per service
started the first time it is asked for; the service list is polled the same way so
routing by name knows every service. Unreachable Nacos: the last lists known keep
serving, logged once per outage, `opus_discovery_stale{backend="nacos"}` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import aiohttp

from sidecar.config import AppConfig, NacosDiscoveryConfig
from sidecar.discovery.base import Discovery, Endpoint, Instance, endpoint_meta, same_endpoints
from sidecar.health import RegistryHealth, probe_app
from sidecar.metrics import Metrics

logger = logging.getLogger("sidecar.discovery.nacos")

_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, ValueError)
# Nacos's own result code for a beat whose instance it does not know (RESOURCE_NOT_FOUND).
BEAT_NOT_FOUND = 20404
# How often the app is probed at most, so a dead app leaves rotation within about 1 s.
APP_PROBE_INTERVAL = 1.0
SERVICE_PAGE_SIZE = 1000


class NacosError(Exception):
    """Nacos answered, but not with what we asked for."""


_FAILURES = (*_ERRORS, NacosError)


def parse_hosts(hosts: object) -> tuple[Endpoint, ...]:
    """Endpoints from the `hosts` of a ServiceInfo (healthy and enabled only)."""
    endpoints: list[Endpoint] = []
    if not isinstance(hosts, list):
        return ()
    for host in hosts:
        if not isinstance(host, dict):
            continue
        ip, port = host.get("ip"), host.get("port")
        if not (isinstance(ip, str) and ip and isinstance(port, int) and 0 < port < 65536):
            continue
        if host.get("healthy") is False or host.get("enabled") is False:
            continue
        meta = host.get("metadata") or {}
        zone = meta.get("zone", "") if isinstance(meta, dict) else ""
        weight = host.get("weight", 1)
        endpoints.append(
            Endpoint(
                host=ip,
                port=port,
                zone=zone if isinstance(zone, str) else "",
                weight=max(1, round(weight)) if isinstance(weight, int | float) else 1,
                instance_id=str(host.get("instanceId") or f"{ip}#{port}"),
                meta=endpoint_meta(meta),
            )
        )
    return tuple(sorted(endpoints, key=lambda e: (e.host, e.port, e.instance_id)))


def _is_v2_envelope(body: str) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and "code" in payload and "data" in payload


class NacosDiscovery(Discovery):
    def __init__(self, config: NacosDiscoveryConfig, app: AppConfig) -> None:
        super().__init__()
        self._config = config
        self._app = app
        address = config.address or os.environ.get("NACOS_ADDR", "") or "http://127.0.0.1:8848"
        self._base = address if "//" in address else "http://" + address
        self._api = "v1" if config.api == "v1" else "v2"
        self._status = RegistryHealth("nacos", logger)
        self._session: aiohttp.ClientSession | None = None
        self._configured = frozenset(config.watch)
        self._listed: frozenset[str] = frozenset()
        self._services: frozenset[str] = self._configured
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._synced: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._instance: Instance | None = None
        self._registered = False

    def bind_metrics(self, metrics: Metrics) -> None:
        self._status.bind(metrics)

    @property
    def api(self) -> str:
        return self._api

    # -- HTTP ---------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._config.request_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def _common(self, service: str) -> dict[str, str]:
        params = {"serviceName": service, "groupName": self._config.group}
        if self._config.namespace:
            params["namespaceId"] = self._config.namespace
        return params

    async def _request(self, what: str, method: str, path: str, params: dict[str, str]) -> Any:
        """One Open API call on the current API version; v2's `{code, data}` is unwrapped."""
        try:
            result = await self._send(method, path, params)
        except _FAILURES as exc:
            self._status.failed(what, exc)
            raise
        self._status.ok()
        return result

    async def _send(self, method: str, path: str, params: dict[str, str]) -> Any:
        if self._api == "v2":
            async with self._http().request(
                method, f"{self._base}/nacos/v2/ns/{path}", params=params
            ) as resp:
                if resp.status == 404 and self._config.api == "auto":
                    body = await resp.text()
                    # A v2 server answers 404 for a missing resource inside its envelope
                    # ({code, message, data}); a 1.x server has no such route at all.
                    if not _is_v2_envelope(body):
                        logger.info("Nacos has no v2 Open API; using v1 at %s", self._base)
                        self._api = "v1"
                        return await self._send(method, path, params)
                payload = await resp.json(content_type=None)
            if not isinstance(payload, dict):
                raise NacosError(f"{path}: unexpected answer {payload!r}")
            if payload.get("code") not in (0, None) and resp.status >= 400:
                raise NacosError(f"{path}: {payload.get('code')} {payload.get('message')}")
            return payload.get("data")
        async with self._http().request(
            method, f"{self._base}/nacos/v1/ns/{path}", params=params
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise NacosError(f"{path}: HTTP {resp.status} {text[:200]}")
        try:
            return json.loads(text)
        except ValueError:
            return text  # "ok"

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        with contextlib.suppress(*_FAILURES):  # logged; the poll below keeps trying
            await self._list_services()
        self._tasks.append(asyncio.create_task(self._poll_services(), name="nacos-services"))
        events = [self._ensure_poll(s) for s in self._configured]
        if events:
            await asyncio.wait(
                [asyncio.create_task(e.wait()) for e in events],
                timeout=self._config.request_timeout,
            )

    async def close(self) -> None:
        tasks = [*self._tasks, *self._polls.values()]
        self._tasks.clear()
        self._polls.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- what calls read -------------------------------------------------------

    def services(self) -> frozenset[str]:
        return self._services

    def endpoints(self, service: str) -> tuple[Endpoint, ...] | None:
        found = self._endpoints.get(service)
        if found is not None:
            return found
        if service not in self._services:
            return None
        self._ensure_poll(service)
        return self._endpoints.setdefault(service, ())

    # -- polls --------------------------------------------------------------------

    async def _list_services(self) -> None:
        params = {"pageNo": "1", "pageSize": str(SERVICE_PAGE_SIZE)}
        params["groupName"] = self._config.group
        if self._config.namespace:
            params["namespaceId"] = self._config.namespace
        data = await self._request("service list", "GET", "service/list", params)
        names: list[str] = []
        if isinstance(data, Mapping):
            raw = data.get("services") if "services" in data else data.get("doms")
            if isinstance(raw, list):
                names = [n.split("@@")[-1] for n in raw if isinstance(n, str)]
        self._listed = frozenset(names)
        self._services = self._listed | self._configured | frozenset(self._endpoints)

    async def _poll_services(self) -> None:
        while True:
            await asyncio.sleep(max(self._config.poll_interval, 1.0))
            with contextlib.suppress(*_FAILURES):  # logged once per outage
                await self._list_services()

    def _ensure_poll(self, service: str) -> asyncio.Event:
        event = self._synced.get(service)
        if event is None:
            event = self._synced[service] = asyncio.Event()
            self._polls[service] = asyncio.get_running_loop().create_task(
                self._poll(service, event), name=f"nacos-poll-{service}"
            )
        return event

    async def _poll(self, service: str, synced: asyncio.Event) -> None:
        while True:
            try:
                await self.refresh_service(service)
                synced.set()
            except _FAILURES:
                pass  # keep the last list known
            await asyncio.sleep(self._config.poll_interval)

    async def refresh_service(self, service: str) -> tuple[Endpoint, ...]:
        params = self._common(service)
        params["healthyOnly"] = "true"
        if self._config.cluster:
            params["clusterName" if self._api == "v2" else "clusters"] = self._config.cluster
        data = await self._request(f"list of {service}", "GET", "instance/list", params)
        hosts = data.get("hosts") if isinstance(data, Mapping) else None
        endpoints = parse_hosts(hosts or [])
        if not same_endpoints(self._endpoints.get(service), endpoints):
            self._endpoints[service] = endpoints
            if service not in self._services:
                self._services = self._services | {service}
            self._notify(service, endpoints)
        return endpoints

    # -- registration ------------------------------------------------------------

    def _instance_params(self, instance: Instance) -> dict[str, str]:
        params = self._common(instance.service)
        meta = {**instance.meta, "protocol": instance.protocol, "instance_id": instance.instance_id}
        if instance.zone:
            meta["zone"] = instance.zone
        params.update(
            ip=instance.host,
            port=str(instance.port),
            clusterName=self._config.cluster,
            ephemeral="true",
            weight="1",
            enabled="true",
            healthy="true",
            metadata=json.dumps(meta, separators=(",", ":")),
        )
        return params

    async def register(self, instance: Instance) -> None:
        """Register now (an error here is raised), then beat until deregistered."""
        if self._instance is not None:
            await self.deregister()
        await self._request("register", "POST", "instance", self._instance_params(instance))
        self._instance = instance
        self._registered = True
        logger.info(
            "registered %s:%d as %s in Nacos (%s API)",
            instance.host,
            instance.port,
            instance.service,
            self._api,
        )
        self._tasks.append(asyncio.create_task(self._keep_alive(instance), name="nacos-beat"))

    async def deregister(self) -> None:
        instance, self._instance = self._instance, None
        beat = next((t for t in self._tasks if t.get_name() == "nacos-beat"), None)
        if beat is not None:
            self._tasks.remove(beat)
            beat.cancel()
            await asyncio.wait([beat])
        if instance is None or not self._registered:
            return
        self._registered = False
        try:
            await self._request("deregister", "DELETE", "instance", self._remove_params(instance))
        except _FAILURES:
            logger.warning("could not deregister from Nacos; the instance expires without beats")
        else:
            logger.info("deregistered %s:%d from Nacos", instance.host, instance.port)

    def _remove_params(self, instance: Instance) -> dict[str, str]:
        params = self._common(instance.service)
        params.update(
            ip=instance.host,
            port=str(instance.port),
            clusterName=self._config.cluster,
            ephemeral="true",
        )
        return params

    async def _beat(self, instance: Instance) -> None:
        beat = {
            "serviceName": f"{self._config.group}@@{instance.service}",
            "ip": instance.host,
            "port": instance.port,
            "cluster": self._config.cluster,
            "weight": 1,
            "scheduled": True,
            "period": int(self._config.beat_interval * 1000),
            "metadata": self._instance_params(instance)["metadata"],
        }
        params = self._common(instance.service)
        params.update(
            ip=instance.host,
            port=str(instance.port),
            clusterName=self._config.cluster,
            ephemeral="true",
            beat=json.dumps(beat, separators=(",", ":")),
        )
        data = await self._request("beat", "PUT", "instance/beat", params)
        if isinstance(data, Mapping) and data.get("code") == BEAT_NOT_FOUND:
            # Nacos forgot us (restarted, or we were gone past its delete timeout).
            await self._request("register", "POST", "instance", self._instance_params(instance))

    async def _keep_alive(self, instance: Instance) -> None:
        loop = asyncio.get_running_loop()
        tick = min(self._config.beat_interval, APP_PROBE_INTERVAL)
        next_beat = loop.time() + self._config.beat_interval
        while True:
            await asyncio.sleep(tick)
            healthy = await probe_app(self._app, min(tick, 0.5))
            try:
                if not healthy and self._registered:
                    logger.warning("app health probe fails: leaving Nacos until it passes")
                    await self._request(
                        "deregister", "DELETE", "instance", self._remove_params(instance)
                    )
                    self._registered = False
                elif healthy and not self._registered:
                    logger.info("app health probe passes again: registering in Nacos")
                    await self._request(
                        "register", "POST", "instance", self._instance_params(instance)
                    )
                    self._registered = True
                    next_beat = loop.time() + self._config.beat_interval
                elif healthy and loop.time() >= next_beat:
                    await self._beat(instance)
                    next_beat = loop.time() + self._config.beat_interval
            except _FAILURES:
                pass  # logged once per outage; the next tick tries again
