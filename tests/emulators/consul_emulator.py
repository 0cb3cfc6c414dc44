"""A Consul emulator: the parts of Consul's HTTP API a sidecar uses, as a real HTTP server.

Follows these pages of Consul's API docs (developer.hashicorp.com/consul/api-docs):
- agent/service: `PUT /v1/agent/service/register[?replace-existing-checks]` (Check/Checks,
  TTL, Status, DeregisterCriticalServiceAfter; keys are case-insensitive as in Consul),
  `PUT /v1/agent/service/deregister/:service_id`;
- agent/check: `PUT /v1/agent/check/pass|warn|fail/:check_id[?note=]`,
  `PUT /v1/agent/check/update/:check_id` ({Status, Output}); a TTL check not refreshed
  within its TTL goes critical, and a service whose check stays critical for
  DeregisterCriticalServiceAfter is removed;
- health: `GET /v1/health/service/:service[?passing][&dc=][&tag=]`;
- catalog: `GET /v1/catalog/services[?dc=]`, `PUT /v1/catalog/register`,
  `PUT /v1/catalog/deregister` (to place instances in another datacenter);
- features/blocking: reads return `X-Consul-Index`; `?index=N&wait=D` blocks until the
  data's index passes N or D (default 5m, max 10m) passes.
- status: `GET /v1/status/leader`;
- agent/connect (the service mesh CA, with `--connect-ca DIR --trust-domain TD`):
  tests/emulators/consul_connect.py.

Each agent is one listening port in one datacenter (`--dc dc1 --dc dc2` starts two);
they share one state, so `?dc=dc2` on dc1's agent reads dc2 as Consul forwards it.
Test-only admin routes: `PUT /_emulator/outage` with `{"down": true|false}` makes every
API request fail (the connection is dropped) until lifted, `GET /_emulator/state`.

Run: `python -m tests.emulators.consul_emulator --port 0 --ports-file F [--dc dc1 ...]`;
F gets `{"port": <first agent>, "agents": {dc: port}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.emulators import consul_connect

MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration ("10s", "1m30s", "250ms") in seconds; a bare number is seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}")
    return total


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): v for k, v in value.items()}
    return value


@dataclass
class Check:
    check_id: str
    name: str
    service_id: str
    status: str = "critical"
    output: str = ""
    ttl: float | None = None
    expires_at: float = 0.0
    deregister_after: float | None = None
    critical_since: float | None = None


@dataclass
class Service:
    service_id: str
    name: str
    address: str
    port: int
    node: str
    node_address: str
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})


@dataclass
class Datacenter:
    name: str
    services: dict[str, Service] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    # Per-service-name modify index, and the catalog's (names and tags) index.
    service_index: dict[str, int] = field(default_factory=dict)
    catalog_index: int = 1


class State:
    def __init__(self, datacenters: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # TTLs and blocking waits age by it (unit tests: the loop's time)
        self.dcs = {name: Datacenter(name) for name in datacenters}
        self.index = 1
        self.changed = asyncio.Condition()
        self.down = False
        self.connect: consul_connect.ConnectCa | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def notify(self) -> int:
        """A new index for a change, and blocking queries woken to see it."""
        self.index += 1
        async with self.changed:
            self.changed.notify_all()
        return self.index

    def dc(self, name: str) -> Datacenter:
        dc = self.dcs.get(name)
        if dc is None:
            raise web.HTTPInternalServerError(text=f"No path to datacenter {name!r}")
        return dc

    async def bump(self, dc: Datacenter, service: str, catalog: bool = False) -> None:
        self.index += 1
        dc.service_index[service] = self.index
        if catalog:
            dc.catalog_index = self.index
        async with self.changed:
            self.changed.notify_all()

    async def wake_all(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def health(self, dc: Datacenter, name: str, passing: bool, tag: str) -> list[dict[str, Any]]:
        out = []
        for svc in sorted(dc.services.values(), key=lambda s: s.service_id):
            if svc.name != name or (tag and tag not in svc.tags):
                continue
            checks = [c for c in dc.checks.values() if c.service_id == svc.service_id]
            if passing and any(c.status != "passing" for c in checks):
                continue
            out.append(
                {
                    "Node": {"Node": svc.node, "Address": svc.node_address, "Datacenter": dc.name},
                    "Service": {
                        "ID": svc.service_id,
                        "Service": svc.name,
                        "Tags": svc.tags,
                        "Address": svc.address,
                        "Port": svc.port,
                        "Meta": svc.meta,
                        "Weights": svc.weights,
                    },
                    "Checks": [
                        {
                            "Node": svc.node,
                            "CheckID": c.check_id,
                            "Name": c.name,
                            "Status": c.status,
                            "Output": c.output,
                            "ServiceID": svc.service_id,
                            "ServiceName": svc.name,
                        }
                        for c in checks
                    ],
                }
            )
        return out

    def catalog(self, dc: Datacenter) -> dict[str, list[str]]:
        names: dict[str, set[str]] = {}
        for svc in dc.services.values():
            names.setdefault(svc.name, set()).update(svc.tags)
        return {name: sorted(tags) for name, tags in sorted(names.items())}

    async def set_status(self, dc: Datacenter, check: Check, status: str, output: str) -> None:
        now = self.clock()
        if check.ttl is not None:
            check.expires_at = now + check.ttl
        if status == "critical":
            check.critical_since = check.critical_since or now
        else:
            check.critical_since = None
        if status != check.status or output != check.output:
            check.status, check.output = status, output
            svc = dc.services.get(check.service_id)
            await self.bump(dc, svc.name if svc else "")

    async def remove(self, dc: Datacenter, service_id: str) -> bool:
        svc = dc.services.pop(service_id, None)
        if svc is None:
            return False
        for check_id in [c.check_id for c in dc.checks.values() if c.service_id == service_id]:
            del dc.checks[check_id]
        await self.bump(dc, svc.name, catalog=True)
        return True

    async def reap(self) -> None:
        """TTL checks past their TTL go critical; long-critical services are removed."""
        now = self.clock()
        for dc in self.dcs.values():
            for check in list(dc.checks.values()):
                if check.ttl is not None and check.status != "critical" and now > check.expires_at:
                    await self.set_status(dc, check, "critical", "TTL expired")
                if (
                    check.deregister_after is not None
                    and check.critical_since is not None
                    and now - check.critical_since > check.deregister_after
                ):
                    await self.remove(dc, check.service_id)


def _checks_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    if body.get("check"):
        checks.append(_lower_keys(body["check"]))
    for check in body.get("checks") or []:
        checks.append(_lower_keys(check))
    return checks


class Agent:
    """The HTTP API of one agent (one port) in datacenter `dc_name`."""

    def __init__(self, state: State, dc_name: str) -> None:
        self.state = state
        self.dc_name = dc_name
        self.node = f"emulator-{dc_name}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.outage])
        r = app.router
        r.add_put("/v1/agent/service/register", self.register)
        r.add_put("/v1/agent/service/deregister/{id}", self.deregister)
        r.add_put("/v1/agent/check/{status:pass|warn|fail}/{id}", self.check_ttl)
        r.add_put("/v1/agent/check/update/{id}", self.check_update)
        r.add_get("/v1/health/service/{name}", self.health_service)
        r.add_get("/v1/catalog/services", self.catalog_services)
        r.add_put("/v1/catalog/register", self.catalog_register)
        r.add_put("/v1/catalog/deregister", self.catalog_deregister)
        r.add_get("/v1/status/leader", self.leader)
        r.add_get("/v1/agent/connect/ca/roots", self.ca_roots)
        r.add_get("/v1/agent/connect/ca/leaf/{service}", self.ca_leaf)
        r.add_put("/v1/agent/connect/authorize", self.authorize)
        r.add_put("/_emulator/connect/rotate-leaf", self.rotate_leaf)
        r.add_put("/_emulator/connect/rotate-roots", self.rotate_roots)
        r.add_put("/_emulator/connect/intentions", self.set_intentions)
        r.add_put("/_emulator/outage", self.set_outage)
        r.add_get("/_emulator/state", self.dump)
        return app

    @web.middleware
    async def outage(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.state.down and not request.path.startswith("/_emulator/"):
            self._drop(request)
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _drop(request: web.Request) -> None:
        # Unreachable, as far as the client can tell: the connection just closes.
        if request.transport is not None:
            request.transport.close()
        raise web.HTTPServiceUnavailable()

    def _dc(self, request: web.Request) -> Datacenter:
        return self.state.dc(request.query.get("dc") or self.dc_name)

    async def _block(self, request: web.Request, current: Any) -> None:
        """Blocking-query semantics: wait while the data's index is <= ?index."""
        if "index" not in request.query:
            return
        index = int(request.query["index"])
        wait = min(parse_duration(request.query.get("wait", "5m")), MAX_WAIT)
        deadline = self.state.clock() + wait
        state = self.state
        async with state.changed:
            while current() <= index and not state.down:
                left = deadline - self.state.clock()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.changed.wait(), left)
        if state.down:
            self._drop(request)

    @staticmethod
    def _json(data: Any, index: int) -> web.Response:
        return web.json_response(data, headers={"X-Consul-Index": str(index)})

    async def register(self, request: web.Request) -> web.Response:
        body = _lower_keys(await request.json())
        dc = self.state.dc(self.dc_name)
        name = body.get("name")
        if not name:
            return web.Response(status=400, text="Missing service name")
        service_id = body.get("id") or name
        replace = "replace-existing-checks" in request.query
        existing = dc.services.get(service_id)
        svc = Service(
            service_id=service_id,
            name=name,
            address=body.get("address") or "127.0.0.1",
            port=int(body.get("port") or 0),
            node=self.node,
            node_address="127.0.0.1",
            tags=list(body.get("tags") or []),
            meta=dict(body.get("meta") or {}),
            weights=dict(body.get("weights") or {"Passing": 1, "Warning": 1}),
        )
        dc.services[service_id] = svc
        if replace:
            for check_id in [c.check_id for c in dc.checks.values() if c.service_id == service_id]:
                del dc.checks[check_id]
        checks = _checks_of(body)
        now = self.state.clock()
        for i, spec in enumerate(checks):
            check_id = spec.get("checkid") or spec.get("id") or f"service:{service_id}"
            if not (spec.get("checkid") or spec.get("id")) and len(checks) > 1:
                check_id += f":{i + 1}"
            ttl = parse_duration(spec["ttl"]) if spec.get("ttl") else None
            dca = spec.get("deregistercriticalserviceafter")
            status = spec.get("status") or "critical"
            dc.checks[check_id] = Check(
                check_id=check_id,
                name=spec.get("name") or f"Service '{name}' check",
                service_id=service_id,
                status=status,
                ttl=ttl,
                expires_at=now + (ttl or 0),
                deregister_after=parse_duration(dca) if dca else None,
                critical_since=now if status == "critical" else None,
            )
        await self.state.bump(dc, name, catalog=existing is None or existing.tags != svc.tags)
        return web.Response(text="")

    async def deregister(self, request: web.Request) -> web.Response:
        dc = self.state.dc(self.dc_name)
        if not await self.state.remove(dc, request.match_info["id"]):
            return web.Response(status=404, text="Unknown service ID")
        return web.Response(text="")

    async def check_ttl(self, request: web.Request) -> web.Response:
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[
            request.match_info["status"]
        ]
        return await self._update(request.match_info["id"], status, request.query.get("note", ""))

    async def check_update(self, request: web.Request) -> web.Response:
        body = _lower_keys(await request.json())
        status = body.get("status", "")
        if status not in ("passing", "warning", "critical"):
            return web.Response(status=400, text="Invalid check status")
        return await self._update(request.match_info["id"], status, body.get("output", ""))

    async def _update(self, check_id: str, status: str, output: str) -> web.Response:
        dc = self.state.dc(self.dc_name)
        check = dc.checks.get(check_id)
        if check is None:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        if check.ttl is None:
            return web.Response(
                status=500, text=f"CheckID {check_id!r} does not have associated TTL"
            )
        await self.state.set_status(dc, check, status, output)
        return web.Response(text="")

    async def health_service(self, request: web.Request) -> web.Response:
        dc = self._dc(request)
        name = request.match_info["name"]
        await self._block(request, lambda: dc.service_index.get(name, 1))
        passing = "passing" in request.query
        entries = self.state.health(dc, name, passing, request.query.get("tag", ""))
        return self._json(entries, max(dc.service_index.get(name, 1), 1))

    async def catalog_services(self, request: web.Request) -> web.Response:
        dc = self._dc(request)
        await self._block(request, lambda: dc.catalog_index)
        return self._json(self.state.catalog(dc), dc.catalog_index)

    async def catalog_register(self, request: web.Request) -> web.Response:
        body = _lower_keys(await request.json())
        dc = self.state.dc(body.get("datacenter") or self.dc_name)
        spec = _lower_keys(body.get("service") or {})
        service_id = spec.get("id") or spec.get("service")
        svc = Service(
            service_id=service_id,
            name=spec.get("service"),
            address=spec.get("address") or body.get("address") or "127.0.0.1",
            port=int(spec.get("port") or 0),
            node=body.get("node") or f"node-{dc.name}",
            node_address=body.get("address") or "127.0.0.1",
            tags=list(spec.get("tags") or []),
            meta=dict(spec.get("meta") or {}),
        )
        dc.services[service_id] = svc
        check = _lower_keys(body.get("check") or {})
        if check:
            check_id = check.get("checkid") or f"service:{service_id}"
            dc.checks[check_id] = Check(
                check_id=check_id,
                name=check.get("name") or check_id,
                service_id=service_id,
                status=check.get("status") or "passing",
            )
        await self.state.bump(dc, svc.name, catalog=True)
        return web.json_response(True)

    async def catalog_deregister(self, request: web.Request) -> web.Response:
        body = _lower_keys(await request.json())
        dc = self.state.dc(body.get("datacenter") or self.dc_name)
        await self.state.remove(dc, body.get("serviceid") or "")
        return web.json_response(True)

    async def leader(self, request: web.Request) -> web.Response:
        return web.json_response("127.0.0.1:8300")

    def _ca(self) -> consul_connect.ConnectCa:
        if self.state.connect is None:
            raise web.HTTPInternalServerError(
                text="Connect must be enabled in order to use this endpoint"
            )
        return self.state.connect

    async def ca_roots(self, request: web.Request) -> web.Response:
        ca = self._ca()
        await self._block(request, lambda: ca.roots_index)
        return self._json(ca.roots_body(), ca.roots_index)

    async def ca_leaf(self, request: web.Request) -> web.Response:
        ca = self._ca()
        service = request.match_info["service"]
        if ca.due(service):
            ca.issue(service, await self.state.notify())
            await self.state.wake_all()
        await self._block(request, lambda: ca.leaves[service]["ModifyIndex"])
        leaf = ca.leaves[service]
        return self._json(leaf, leaf["ModifyIndex"])

    async def authorize(self, request: web.Request) -> web.Response:
        body = await request.json()
        ok, reason = self._ca().authorize(str(body.get("Target")), str(body.get("ClientCertURI")))
        return web.json_response({"Authorized": ok, "Reason": reason})

    async def _reissue(self, services: list[str] | None = None) -> None:
        ca = self._ca()
        index = await self.state.notify()
        for service in services if services is not None else list(ca.leaves):
            ca.issue(service, index)
        await self.state.wake_all()

    async def rotate_leaf(self, request: web.Request) -> web.Response:
        body = await request.json()
        service = body.get("service")
        await self._reissue([service] if service else None)
        return web.json_response({s: leaf["SerialNumber"] for s, leaf in self._ca().leaves.items()})

    async def rotate_roots(self, request: web.Request) -> web.Response:
        body = await request.json()
        ca = self._ca()
        new = consul_connect.load(body["ca_dir"], ca.trust_domain)
        for root in ca.roots:
            root.active = False
        index = await self.state.notify()
        ca.roots.append(consul_connect.Root(new, index))
        ca.roots_index = index
        await self.state.wake_all()
        task = asyncio.create_task(
            consul_connect.later(float(body.get("grace", 1.0)), self._reissue)
        )
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)
        return web.json_response(ca.roots_body())

    async def set_intentions(self, request: web.Request) -> web.Response:
        self._ca().intentions = await request.json()
        return web.json_response(True)

    async def set_outage(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.state.down = bool(body.get("down"))
        await self.state.wake_all()  # blocking queries in flight see the outage now
        return web.json_response({"down": self.state.down})

    async def dump(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "down": self.state.down,
                "datacenters": {
                    dc.name: {
                        "services": sorted(dc.services),
                        "checks": {c.check_id: c.status for c in dc.checks.values()},
                    }
                    for dc in self.state.dcs.values()
                },
            }
        )


async def serve(
    host: str,
    port: int,
    datacenters: list[str],
    clock: Callable[[], float] = time.monotonic,
    connect: consul_connect.ConnectCa | None = None,
) -> tuple[State, list[web.AppRunner], dict[str, int]]:
    """Start one agent per datacenter (the first on `port`); returns the ports by dc."""
    state = State(datacenters, clock)
    state.connect = connect
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}
    for i, dc in enumerate(datacenters):
        runner = web.AppRunner(Agent(state, dc).app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port if i == 0 else 0)
        await site.start()
        ports[dc] = runner.addresses[0][1]
        runners.append(runner)
    return state, runners, ports


async def _reaper(state: State) -> None:
    while True:
        await asyncio.sleep(0.1)
        await state.reap()


async def _main(args: argparse.Namespace) -> None:
    dcs = args.dc or ["dc1"]
    connect = None
    if args.connect_ca:
        root = consul_connect.Root(consul_connect.load(args.connect_ca, args.trust_domain), 1)
        connect = consul_connect.ConnectCa(args.trust_domain, dcs[0], args.leaf_ttl, [root])
    state, _runners, ports = await serve(args.host, args.port, dcs, connect=connect)
    reaper = asyncio.create_task(_reaper(state))
    first = next(iter(ports.values()))
    tmp = args.ports_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": first, "agents": ports}, fh)
    os.replace(tmp, args.ports_file)
    try:
        await asyncio.Event().wait()
    finally:
        reaper.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ports-file", required=True)
    parser.add_argument("--dc", action="append", help="a datacenter (repeat; default dc1)")
    parser.add_argument("--connect-ca", default="", help="a CA directory (ca.crt, ca.key)")
    parser.add_argument("--trust-domain", default="11111111-2222-3333-4444-555555555555.consul")
    parser.add_argument("--leaf-ttl", type=float, default=72 * 3600.0, help="seconds")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
