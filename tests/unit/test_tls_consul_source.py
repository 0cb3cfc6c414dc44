"""The `consul` certificate source without sockets: the agent's answers parsed, the
config checked at load (each error naming its key), the renewal time and the leaf
query's wait by an injected clock, and a failing or nonsensical agent leaving the
material in use. The agent is an in-memory stand-in for py-consul's HTTP client that
answers with the JSON shapes Consul documents (agent/connect), real certificates from
a CA made here; and, for intentions and a blocking leaf query, the Consul emulator
(tests/emulators/consul_emulator.py) in process on 127.0.0.1 port 0, on a
VirtualTimeLoop whose clock the emulator's waits keep."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from consul import base

from sidecar.config import ConfigError, SidecarConfig, load_config
from sidecar.discovery.consul import consul_client
from sidecar.tls import devca
from sidecar.tls.consul_source import (
    ConsulCaError,
    ConsulSource,
    authorize,
    consul_identity,
    parse_leaf,
    parse_roots,
    split_address,
)
from sidecar.tls.contexts import TlsState
from sidecar.tls.material import MaterialError
from sidecar.tls.setup import MeshTls
from tests.emulators import consul_connect, consul_emulator
from tests.unit.faketime import run_virtual

TD = "11111111-2222-3333-4444-555555555555.consul"
T0 = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)
TTL = 3600.0


class FakeAgent:
    """Answers `http.get(callback, path, params=, headers=)` as the agent would, or raises."""

    def __init__(self, ca: devca.DevCa, service: str = "web") -> None:
        self.ca = ca
        self.service = service
        self.index = 10
        self.fail: Exception | None = None
        self.bad_leaf = False
        self.calls: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.http = self
        self.now = T0  # when leaves are issued
        self.leaf = self._issue()

    def _issue(self) -> dict[str, Any]:
        uri = consul_identity(TD, "default", "dc1", self.service)
        chain, key = devca.issue(self.ca, uri, TTL, now=self.now)
        return {"SerialNumber": "0a", "CertPEM": chain.decode(), "PrivateKeyPEM": key.decode()}

    def rotate(self) -> None:
        self.index += 1
        self.leaf = self._issue()

    def _answer(self, path: str) -> tuple[int, object]:
        if path.endswith("/roots"):
            root = {"ID": "aa", "RootCert": self.ca.cert_pem.decode(), "Active": True}
            return 200, {"ActiveRootID": "aa", "TrustDomain": TD, "Roots": [root]}
        if self.bad_leaf:
            return 200, {"CertPEM": 5}
        return 200, self.leaf

    def _respond(self, callback: Any, path: str, params: Any, headers: Any) -> Any:
        self.calls.append((path, dict(params or ()), dict(headers or {})))
        if self.fail is not None:
            raise self.fail
        code, body = self._answer(path)
        response = base.Response(code, {"X-Consul-Index": str(self.index)}, json.dumps(body))
        return callback(response)

    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return self._respond(callback, path, params, headers)


class SyncView:
    """The same agent through py-consul's synchronous client's shape."""

    def __init__(self, agent: FakeAgent) -> None:
        self.http = self
        self.agent = agent

    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return self.agent._respond(callback, path, params, headers)


class AsyncAgent(FakeAgent):
    async def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return self._respond(callback, path, params, headers)


def _source(agent: FakeAgent, clock: list[datetime.datetime], **kw: Any) -> ConsulSource:
    return ConsulSource(
        address="127.0.0.1:8500",
        token="s3cret",
        service="web",
        trust_domain=TD,
        now=lambda: clock[0],
        client=agent,
        sync_client=SyncView(agent),
        **kw,
    )


@pytest.fixture(scope="module")
def ca() -> devca.DevCa:
    return devca.make_ca(TD, now=T0 - datetime.timedelta(days=1))


# -- the agent's answers --


def test_parse_roots_keeps_every_root_and_the_trust_domain(ca: devca.DevCa) -> None:
    other = devca.make_ca(TD)
    data = {
        "ActiveRootID": "b",
        "TrustDomain": TD,
        "Roots": [
            {"ID": "a", "RootCert": ca.cert_pem.decode(), "Active": False},
            {"ID": "b", "RootCert": other.cert_pem.decode(), "Active": True},
        ],
    }
    bundle, trust_domain = parse_roots(data)
    assert trust_domain == TD
    assert bundle.count(b"BEGIN CERTIFICATE") == 2


@pytest.mark.parametrize(
    "data", [None, {"Roots": None}, {"Roots": []}, {"Roots": [{"ID": "a", "RootCert": "x"}]}]
)
def test_parse_roots_refuses_what_is_not_a_roots_answer(data: object) -> None:
    with pytest.raises(ConsulCaError, match="/v1/agent/connect/ca/roots"):
        parse_roots(data)


def test_parse_leaf(ca: devca.DevCa) -> None:
    assert parse_leaf({"CertPEM": "C", "PrivateKeyPEM": "K"}) == (b"C", b"K")
    with pytest.raises(ConsulCaError, match="CertPEM and PrivateKeyPEM"):
        parse_leaf({"CertPEM": "C"})


def test_split_address() -> None:
    assert split_address("") == {}
    assert split_address("10.0.0.1:8501") == {"host": "10.0.0.1", "port": 8501, "scheme": "http"}
    assert split_address("https://consul") == {"host": "consul", "port": 8500, "scheme": "https"}
    for bad in ("ftp://x:1", "x:notaport", "http://x:1/v1"):
        with pytest.raises(ValueError):
            split_address(bad)


# -- config --


def _load(tmp_path: Path, tls: dict[str, Any]) -> SidecarConfig:
    path = tmp_path / "sidecar.yaml"
    base_tls = {"mode": "strict", "trust_domain": TD, "source": "consul"}
    path.write_text(yaml.safe_dump({"tls": {**base_tls, **tls}}))
    return load_config(str(path), environ={})


def test_config_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"consul": {"address": "127.0.0.1:8500"}})
    assert cfg.tls.source == "consul"
    assert cfg.tls.consul.wait == 300.0
    assert cfg.tls.consul.namespace == ""


@pytest.mark.parametrize(
    ("tls", "key"),
    [
        ({"trust_domain": "mesh.test"}, "tls.trust_domain"),
        ({"consul": {"address": "ftp://x:1"}}, "tls.consul.address"),
        ({"consul": {"wait": 0.5}}, "tls.consul.wait"),
        ({"consul": {"wait": 601}}, "tls.consul.wait"),
        ({"consul": {"retry_max": 0}}, "tls.consul.retry_max"),
        ({"consul": {"namespace": "a/b"}}, "tls.consul.namespace"),
        ({"consul": {"datacenter": "dc 1"}}, "tls.consul.datacenter"),
        ({"consul": {"adress": "x"}}, "tls.consul.adress"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, tls: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, tls)
    assert key in str(err.value)


# -- first material, identities --


def test_load_reads_roots_and_leaf_with_the_token(ca: devca.DevCa) -> None:
    agent = FakeAgent(ca)
    source = _source(agent, [T0])
    got = source.load()
    assert got.identity == consul_identity(TD, "default", "dc1", "web")
    assert source.index == {"roots": 10, "leaf": 10}
    assert source.datacenter == "dc1"  # learned from the leaf, for secure naming
    paths = [path for path, _, _ in agent.calls]
    assert paths == ["/v1/agent/connect/ca/roots", "/v1/agent/connect/ca/leaf/web"]
    assert all(headers == {"X-Consul-Token": "s3cret"} for _, _, headers in agent.calls)


def test_load_gives_up_after_start_timeout_naming_the_source(ca: devca.DevCa) -> None:
    agent = FakeAgent(ca)
    agent.fail = OSError("connection refused")
    with pytest.raises(MaterialError, match=r"tls\.consul.*connection refused"):
        _source(agent, [T0], start_timeout=0.01).load()


def test_secure_naming_default_is_the_consul_form(tmp_path: Path, ca: devca.DevCa) -> None:
    cfg = _load(tmp_path, {"consul": {"address": "127.0.0.1:8500"}})
    mesh = MeshTls(cfg, _source(FakeAgent(ca), [T0]))
    assert mesh.expected_identity("inventory") == consul_identity(TD, "default", "dc1", "inventory")
    assert mesh.expected_identity("inventory", "spiffe://x/y") == "spiffe://x/y"


# -- renewal and failures --


def _started(agent: FakeAgent, clock: list[datetime.datetime]) -> tuple[ConsulSource, TlsState]:
    source = _source(agent, clock)
    state = TlsState(TD, "1.3", source.load())
    source.state = state  # as start() would, without its watch tasks
    agent.calls.clear()
    return source, state


def test_leaf_query_waits_until_two_thirds_of_the_lifetime(ca: devca.DevCa) -> None:
    clock = [T0]
    source, _ = _started(FakeAgent(ca), clock)
    # devca back-dates not-before by a little: 2/3 of the life is ~40 min from T0.
    assert source.renew_at() - T0 < datetime.timedelta(minutes=41)
    assert source.leaf_wait() == 300.0  # the configured wait, far from renewal
    clock[0] = source.renew_at() - datetime.timedelta(seconds=42)
    assert source.leaf_wait() == pytest.approx(42.0)
    assert not source.renew_due()
    clock[0] = source.renew_at()
    assert source.renew_due()


def test_a_blocking_answer_with_a_new_leaf_is_put_in_use(ca: devca.DevCa) -> None:
    agent = AsyncAgent(ca)
    source, state = _started(agent, [T0])
    old = state.material.leaf.serial_number
    assert run_virtual(source.step("leaf")) is False
    assert state.generation == 1  # same index, same leaf: nothing rebuilt
    _, params, _ = agent.calls[-1]
    assert params["index"] == "10" and params["wait"] == "300000ms"
    agent.rotate()
    assert run_virtual(source.step("leaf")) is False
    assert state.material.leaf.serial_number != old and source.updates == 1
    assert source.index["leaf"] == 11


def test_past_two_thirds_the_leaf_is_asked_for_without_blocking(ca: devca.DevCa) -> None:
    agent = AsyncAgent(ca)
    clock = [T0]
    source, _state = _started(agent, clock)
    clock[0] = source.renew_at() + datetime.timedelta(seconds=1)
    run_virtual(source.step("leaf"))
    assert "index" not in agent.calls[-1][1]  # a fresh read, not a blocking one
    # The agent had nothing newer: the next query blocks again (no hot loop).
    run_virtual(source.step("leaf"))
    assert agent.calls[-1][1]["index"] == "10"
    clock[0] += datetime.timedelta(seconds=1)
    agent.now = clock[0]
    agent.rotate()
    run_virtual(source.step("leaf"))
    assert source.updates == 1 and not source.renew_due()


def test_a_failing_agent_keeps_the_material_and_counts(ca: devca.DevCa) -> None:
    agent = AsyncAgent(ca)
    source, state = _started(agent, [T0])
    failures: list[int] = []
    source.on_failure = lambda: failures.append(1)
    before = state.material
    agent.fail = OSError("connection refused")
    assert run_virtual(source.step("roots")) is True
    assert run_virtual(source.step("leaf")) is True
    assert state.material is before and len(failures) == 2 == source.failures
    agent.fail = None
    agent.bad_leaf = True  # an answer that makes no usable material
    assert run_virtual(source.step("leaf")) is True
    assert state.material is before
    agent.bad_leaf = False
    agent.rotate()
    assert run_virtual(source.step("leaf")) is False
    assert state.material is not before


def test_the_watch_backs_off_doubling_up_to_retry_max(ca: devca.DevCa) -> None:
    agent = AsyncAgent(ca)
    slept: list[float] = []
    clock = [0.0]
    source = _source(agent, [T0], retry_max=0.5, monotonic=lambda: clock[0])

    async def sleep(delay: float) -> None:
        slept.append(delay)
        clock[0] += delay
        if len(slept) == 5:
            source.close()

    source._sleep = sleep
    source.state = TlsState(TD, "1.3", source.load())
    agent.fail = OSError("down")
    run_virtual(source._watch("roots"))
    assert slept == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_a_roots_answer_for_another_trust_domain_is_refused(ca: devca.DevCa) -> None:
    source, _state = _started(AsyncAgent(ca), [T0])
    with pytest.raises(ConsulCaError, match="trust domain"):
        source.take(
            "roots", {"TrustDomain": "other.consul", "Roots": [{"RootCert": ca.cert_pem.decode()}]}
        )


# -- against the emulator's HTTP API, in process (py-consul's real aio client) --


async def _with_connect(ca: devca.DevCa, body: Callable[[Any, Any], Awaitable[None]]) -> None:
    connect = consul_connect.ConnectCa(TD, "dc1", TTL, [consul_connect.Root(ca, 1)])
    clock = asyncio.get_running_loop().time
    state, runners, ports = await consul_emulator.serve(
        "127.0.0.1", 0, ["dc1"], clock, connect=connect
    )
    client = consul_client(f"127.0.0.1:{ports['dc1']}", "")
    try:
        await body(client, state)
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()


def test_intentions_through_agent_connect_authorize(ca: devca.DevCa) -> None:
    async def body(client: Any, state: Any) -> None:
        state.connect.intentions = {
            "default": "deny",
            "rules": [{"source": "payment", "destination": "inventory", "action": "allow"}],
        }
        payment = consul_identity(TD, "default", "dc1", "payment")
        ok, reason = await authorize(client, "inventory", payment, "0a")
        assert ok and "payment => inventory" in reason
        ok, _ = await authorize(client, "billing", payment, "0a")
        assert not ok

    run_virtual(_with_connect(ca, body))


def test_a_leaf_rotation_arrives_through_the_blocking_query(ca: devca.DevCa) -> None:
    async def body(client: Any, state: Any) -> None:
        source = _source(AsyncAgent(ca), [datetime.datetime.now(datetime.UTC)])
        source._client = client
        for kind in ("roots", "leaf"):
            assert await source.step(kind) is False
        source.state = TlsState(TD, "1.3", source.build())
        first = source.state.material.leaf.serial_number
        waiting = asyncio.create_task(source.step("leaf"))  # blocks: nothing changed
        await asyncio.sleep(1)
        assert not waiting.done()
        index = await state.notify()
        state.connect.issue("web", index)
        await state.wake_all()
        assert await waiting is False
        assert source.state.material.leaf.serial_number != first

    run_virtual(_with_connect(ca, body))


def test_a_watch_is_rate_limited_whatever_the_agent_answers(ca: devca.DevCa) -> None:
    agent = AsyncAgent(ca)  # answers at once, every time: an index that never blocks
    clock = [0.0]
    slept: list[float] = []
    source = _source(agent, [T0], max_queries_per_second=10.0, monotonic=lambda: clock[0])

    async def sleep(delay: float) -> None:
        slept.append(delay)
        clock[0] += delay
        if len(slept) == 4:
            source.close()

    source._sleep = sleep
    source.state = TlsState(TD, "1.3", source.load())
    agent.calls.clear()
    run_virtual(source._watch("roots"))
    assert slept == pytest.approx([0.1] * 4)  # a burst of 2, then 10 a second
    assert len(agent.calls) == 5


def test_max_queries_per_second_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.consul\.max_queries_per_second"):
        _load(tmp_path, {"consul": {"max_queries_per_second": 0}})
