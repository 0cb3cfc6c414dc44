"""A Nacos emulator: the naming part of Nacos's HTTP Open API, as a real HTTP server.

Follows Nacos's Open API pages (nacos.io, "Open API" for 1.x and "Open API v2" for 2.x):
- v2: `POST|DELETE /nacos/v2/ns/instance`, `PUT /nacos/v2/ns/instance/beat`,
  `GET /nacos/v2/ns/instance/list` (healthyOnly), `GET /nacos/v2/ns/service/list`;
  answers are `{"code": 0, "message": "success", "data": ...}`;
- v1: `POST|DELETE /nacos/v1/ns/instance`, `PUT /nacos/v1/ns/instance/beat`,
  `GET /nacos/v1/ns/instance/list`, `GET /nacos/v1/ns/service/list`; plain answers.
Parameters come in the query string or a form body; `namespaceId` (default "public")
and `groupName` (default DEFAULT_GROUP, or a `group@@service` serviceName) scope every
instance. Ephemeral instances turn unhealthy `--unhealthy-after` seconds (Nacos: 15)
after their last beat and are deleted after `--delete-after` (Nacos: 30); a beat for
an unknown instance answers code 20404. `--v1-only` plays a 1.x server: v2 paths 404.

Run: `python -m tests.emulators.nacos_emulator --port 0 --ports-file F
[--unhealthy-after 2] [--delete-after 4] [--v1-only]`; F gets `{"port": N}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BEAT_NOT_FOUND = 20404
BEAT_OK = 10200


@dataclass
class NacosInstance:
    ip: str
    port: int
    cluster: str
    weight: float = 1.0
    healthy: bool = True
    enabled: bool = True
    ephemeral: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    last_beat: float = 0.0

    def as_host(self, service: str) -> dict[str, Any]:
        return {
            "instanceId": f"{self.ip}#{self.port}#{self.cluster}#{service}",
            "ip": self.ip,
            "port": self.port,
            "weight": self.weight,
            "healthy": self.healthy,
            "enabled": self.enabled,
            "ephemeral": self.ephemeral,
            "clusterName": self.cluster,
            "serviceName": service,
            "metadata": self.metadata,
        }


Key = tuple[str, str, str]  # namespace, group, service


class Registry:
    def __init__(
        self,
        unhealthy_after: float,
        delete_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unhealthy_after = unhealthy_after
        self.delete_after = delete_after
        self.clock = clock  # beats age by it (unit tests: the virtual loop's time)
        self.services: dict[Key, dict[tuple[str, int, str], NacosInstance]] = {}

    def reap(self) -> None:
        now = self.clock()
        for instances in self.services.values():
            for key, inst in list(instances.items()):
                if not inst.ephemeral:
                    continue
                if now - inst.last_beat > self.delete_after:
                    del instances[key]
                elif now - inst.last_beat > self.unhealthy_after:
                    inst.healthy = False


async def _params(request: web.Request) -> dict[str, str]:
    params = dict(request.query)
    if request.can_read_body:
        form = await request.post()
        params.update({k: str(v) for k, v in form.items()})
    return params


def _key(params: dict[str, str]) -> Key:
    service = params.get("serviceName", "")
    group = params.get("groupName") or "DEFAULT_GROUP"
    if "@@" in service:
        group, service = service.split("@@", 1)
    if not service:
        raise web.HTTPBadRequest(text="serviceName is required")
    return params.get("namespaceId") or "public", group, service


def _bool(text: str | None, default: bool) -> bool:
    return default if text is None else text.lower() == "true"


class NacosEmulator:
    def __init__(self, registry: Registry, v1_only: bool) -> None:
        self.registry = registry
        self.v1_only = v1_only

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        for version in ("v1", "v2"):
            base = f"/nacos/{version}/ns"
            r.add_post(f"{base}/instance", self._wrap(version, self.register))
            r.add_delete(f"{base}/instance", self._wrap(version, self.deregister))
            r.add_put(f"{base}/instance/beat", self._wrap(version, self.beat))
            r.add_get(f"{base}/instance/list", self._wrap(version, self.list_instances))
            r.add_get(f"{base}/service/list", self._wrap(version, self.list_services))
        r.add_get("/_emulator/state", self.dump)
        return app

    def _wrap(self, version: str, handler: Any) -> Any:
        async def route(request: web.Request) -> web.Response:
            if version == "v2" and self.v1_only:
                return web.Response(status=404, text="Not Found")
            try:
                data = await handler(version, await _params(request))
            except web.HTTPBadRequest as exc:
                if version == "v2":
                    body = {"code": 10000, "message": exc.text, "data": None}
                    return web.json_response(body, status=400)
                raise
            if version == "v2":
                return web.json_response({"code": 0, "message": "success", "data": data})
            if isinstance(data, str):
                return web.Response(text=data)
            return web.json_response(data)

        return route

    async def register(self, version: str, params: dict[str, str]) -> Any:
        key = _key(params)
        ip, port = params.get("ip"), params.get("port")
        if not ip or not port:
            raise web.HTTPBadRequest(text="ip and port are required")
        cluster = params.get("clusterName") or "DEFAULT"
        meta = json.loads(params["metadata"]) if params.get("metadata") else {}
        self.registry.services.setdefault(key, {})[(ip, int(port), cluster)] = NacosInstance(
            ip=ip,
            port=int(port),
            cluster=cluster,
            weight=float(params.get("weight") or 1),
            healthy=_bool(params.get("healthy"), True),
            enabled=_bool(params.get("enabled"), True),
            ephemeral=_bool(params.get("ephemeral"), True),
            metadata=meta,
            last_beat=self.registry.clock(),
        )
        return "ok"

    async def deregister(self, version: str, params: dict[str, str]) -> Any:
        key = _key(params)
        cluster = params.get("clusterName") or "DEFAULT"
        instances = self.registry.services.get(key, {})
        instances.pop((params.get("ip", ""), int(params.get("port") or 0), cluster), None)
        return "ok"

    async def beat(self, version: str, params: dict[str, str]) -> Any:
        beat = json.loads(params["beat"]) if params.get("beat") else {}
        merged = {**params}
        merged.setdefault("ip", str(beat.get("ip", "")))
        merged.setdefault("port", str(beat.get("port", "")))
        merged.setdefault("clusterName", str(beat.get("cluster", "")))
        if "serviceName" not in merged:
            merged["serviceName"] = str(beat.get("serviceName", ""))
        key = _key(merged)
        cluster = merged.get("clusterName") or "DEFAULT"
        inst = self.registry.services.get(key, {}).get(
            (merged["ip"], int(merged["port"] or 0), cluster)
        )
        if inst is None:
            return {"code": BEAT_NOT_FOUND}
        inst.last_beat = self.registry.clock()
        inst.healthy = True
        return {"clientBeatInterval": 5000, "code": BEAT_OK, "lightBeatEnabled": True}

    async def list_instances(self, version: str, params: dict[str, str]) -> Any:
        self.registry.reap()
        namespace, group, service = _key(params)
        healthy_only = _bool(params.get("healthyOnly"), False)
        clusters = params.get("clusterName") or params.get("clusters") or ""
        wanted = {c for c in clusters.split(",") if c}
        hosts = [
            inst.as_host(f"{group}@@{service}")
            for inst in self.registry.services.get((namespace, group, service), {}).values()
            if (not healthy_only or inst.healthy) and (not wanted or inst.cluster in wanted)
        ]
        return {
            "name": f"{group}@@{service}",
            "groupName": group,
            "clusters": clusters,
            "cacheMillis": 10000,
            "hosts": hosts,
            "lastRefTime": int(time.time() * 1000),
            "checksum": "",
            "allIPs": False,
            "reachProtectionThreshold": False,
            "valid": True,
        }

    async def list_services(self, version: str, params: dict[str, str]) -> Any:
        namespace = params.get("namespaceId") or "public"
        group = params.get("groupName") or "DEFAULT_GROUP"
        names = sorted(
            s
            for (ns, g, s), inst in self.registry.services.items()
            if ns == namespace and g == group
        )
        if version == "v2":
            return {"count": len(names), "services": names}
        return {"count": len(names), "doms": names}

    async def dump(self, request: web.Request) -> web.Response:
        self.registry.reap()
        return web.json_response(
            {
                "/".join(key): [inst.as_host(key[2]) for inst in instances.values()]
                for key, instances in self.registry.services.items()
            }
        )


async def serve(
    host: str,
    port: int,
    unhealthy_after: float,
    delete_after: float,
    v1_only: bool,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[web.AppRunner, int]:
    emulator = NacosEmulator(Registry(unhealthy_after, delete_after, clock), v1_only)
    runner = web.AppRunner(emulator.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


async def _main(args: argparse.Namespace) -> None:
    _, port = await serve(
        args.host, args.port, args.unhealthy_after, args.delete_after, args.v1_only
    )
    tmp = args.ports_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": port}, fh)
    os.replace(tmp, args.ports_file)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ports-file", required=True)
    parser.add_argument("--unhealthy-after", type=float, default=15.0)
    parser.add_argument("--delete-after", type=float, default=30.0)
    parser.add_argument("--v1-only", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
