"""The Kubernetes (headless Service DNS) backend, driven with an injected resolver."""

from __future__ import annotations

import asyncio
import socket

from sidecar.config import KubernetesDiscoveryConfig
from sidecar.discovery.base import Endpoint
from sidecar.discovery.kubernetes import KubernetesDiscovery


class FakeDns:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.fail: Exception | None = None
        self.asked: list[tuple[str, int]] = []
        self.asked_enough = asyncio.Event()
        self.enough = 10**9

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if len(self.asked) >= self.enough:
            self.asked_enough.set()
        if self.fail is not None:
            raise self.fail
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[host])


def _backend(dns: FakeDns, **config: object) -> KubernetesDiscovery:
    cfg = KubernetesDiscoveryConfig(namespace="shop", port=15006, watch=("inventory",), **config)  # type: ignore[arg-type]
    return KubernetesDiscovery(cfg, resolver=dns)


def test_headless_service_records_become_endpoints() -> None:
    async def go() -> None:
        dns = FakeDns()
        dns.records["inventory.shop.svc.cluster.local"] = ["10.0.0.8", "10.0.0.7", "10.0.0.7"]
        backend = _backend(dns)
        await backend.start()
        try:
            assert dns.asked[0] == ("inventory.shop.svc.cluster.local", 15006)
            assert backend.services() == frozenset({"inventory"})
            assert backend.endpoints("inventory") == (
                Endpoint("10.0.0.7", 15006, instance_id="10.0.0.7"),
                Endpoint("10.0.0.8", 15006, instance_id="10.0.0.8"),
            )
            assert backend.endpoints("unlisted") is None  # DNS cannot list services
        finally:
            await backend.close()

    asyncio.run(go())


def test_changes_notify_and_nxdomain_empties_the_set() -> None:
    async def go() -> None:
        dns = FakeDns()
        name = "inventory.shop.svc.cluster.local"
        dns.records[name] = ["10.0.0.7"]
        backend = _backend(dns)
        seen: list[tuple[Endpoint, ...]] = []
        backend.subscribe("inventory", lambda _s, eps: seen.append(eps))
        await backend.start()
        try:
            dns.records[name] = ["10.0.0.7", "10.0.0.9"]  # a pod became ready
            await backend.resolve_once("inventory")
            await backend.resolve_once("inventory")  # unchanged: no second notification
            del dns.records[name]  # no ready pod left: NXDOMAIN
            await backend.resolve_once("inventory")
            assert [len(eps) for eps in seen] == [1, 2, 0]
            assert backend.endpoints("inventory") == ()
        finally:
            await backend.close()

    asyncio.run(go())


def test_dns_failure_keeps_the_last_endpoints() -> None:
    async def go() -> None:
        dns = FakeDns()
        dns.records["inventory.shop.svc.cluster.local"] = ["10.0.0.7"]
        backend = _backend(dns)
        await backend.start()
        try:
            dns.fail = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            assert await backend.resolve_once("inventory") is None
            assert [e.host for e in backend.endpoints("inventory") or ()] == ["10.0.0.7"]
            dns.fail = TimeoutError()
            assert await backend.resolve_once("inventory") is None
            assert [e.host for e in backend.endpoints("inventory") or ()] == ["10.0.0.7"]
        finally:
            await backend.close()

    asyncio.run(go())


def test_watch_re_resolves_on_its_interval() -> None:
    async def go() -> None:
        dns = FakeDns()
        dns.enough = 4
        dns.records["inventory.shop.svc.cluster.local"] = ["10.0.0.7"]
        backend = _backend(dns, resolve_interval=0.01)
        await backend.start()
        try:
            async with asyncio.timeout(5):
                await dns.asked_enough.wait()
        finally:
            await backend.close()
        assert all(host == "inventory.shop.svc.cluster.local" for host, _ in dns.asked)

    asyncio.run(go())


def test_register_is_the_pods_readiness() -> None:
    async def go() -> None:
        backend = _backend(FakeDns())
        from sidecar.discovery.base import Instance

        await backend.register(Instance("inventory", "i-1", "10.0.0.7", 15006))
        await backend.deregister()  # both no-ops: the kubelet's readiness owns the record

    asyncio.run(go())
