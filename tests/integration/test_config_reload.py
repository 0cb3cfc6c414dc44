"""Live configuration with real processes: a sidecar re-reads its config file on
POST /config/reload, SIGHUP or a change of the file (an atomic rename, a Kubernetes
ConfigMap's `..data` symlink swap), applies it without dropping a call, refuses an
invalid or restart-only one while the old config goes on serving, keeps pooled
connections to clusters the change does not touch, rebinds a moved listener, and
under `workers: 2` switches both workers."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Mesh, Sidecar

pytestmark = pytest.mark.integration

VISIBLE_WITHIN = 5.0  # seconds a watched change may take to be applied (poll 0.05 s)


def _config(sidecar: Sidecar) -> Path:
    return sidecar.log_path.parent / f"{sidecar.name}.yaml"


def _edit(path: Path, change: dict[str, Any], *, target: Path | None = None) -> None:
    """Rewrite the config with `change` merged in, atomically (written beside, renamed)."""
    cfg = yaml.safe_load(path.read_text())
    cfg.update(change)
    dest = target or path
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    os.replace(tmp, dest)


def _reload(sidecar: Sidecar) -> tuple[int, dict[str, Any]]:
    resp = httpx.post(f"{sidecar.admin}/config/reload", timeout=10)
    return resp.status_code, resp.json()


def _dump(sidecar: Sidecar) -> dict[str, Any]:
    dumped: dict[str, Any] = httpx.get(f"{sidecar.admin}/config_dump", timeout=5).json()
    return dumped


def _wait_for_reload(sidecar: Sidecar, trigger: str, generation: int) -> dict[str, Any]:
    deadline = time.monotonic() + VISIBLE_WITHIN
    while time.monotonic() < deadline:
        dumped = _dump(sidecar)
        last = dumped["last_reload"]
        if (
            last
            and last["trigger"] == trigger
            and (dumped["config_version"]["generation"] >= generation or last["result"] != "ok")
        ):
            return dumped
        time.sleep(0.02)
    raise AssertionError(f"no {trigger} reload seen: {_dump(sidecar)}")


def _stamp(version: str) -> dict[str, Any]:
    """The outbound chain as a reload sets it: replies carry x-version."""
    return {
        "filters": {
            "outbound": [
                {"name": "headers", "config": {"response_headers_to_set": {"x-version": version}}}
            ]
        }
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_reloads_under_load_fail_no_call(mesh: Mesh) -> None:
    """Both sidecars of the path are reloaded while two keep-alive callers run."""
    _, inventory = mesh.service("inventory", {"reload": {"watch": False}})
    _, payment = mesh.service("payment", {**_stamp("v0"), "reload": {"watch": False}})
    url = f"{payment.outbound}/v1/invoke/inventory/load"
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        # Keep-alive connections, two callers: calls are in flight at every swap.
        with httpx.Client(timeout=10) as client:
            while not stop.is_set() and len(versions) < 20_000:
                try:
                    resp = client.get(url)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")
                versions.append(resp.headers.get("x-version", "none"))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    path = _config(payment)
    sha = _dump(payment)["config_version"]["sha256"]
    try:
        for i in range(1, 21):
            seen = len(versions)
            if i % 5 == 0:  # invalid in between: refused, the running config untouched
                good = path.read_text()
                _edit(path, {"upstream": {"max_per_route": "many"}})
                status, result = _reload(payment)
                assert (status, result["result"]) == (422, "invalid"), result
                assert "upstream.max_per_route" in result["error"]
                assert _dump(payment)["config_version"]["sha256"] == sha
                path.write_text(good)
                continue
            change: dict[str, Any] = _stamp(f"v{i}")
            if i % 2:  # a filter added and removed, a route moved
                change["routes"] = [{"prefix": f"/r{i}", "service": "inventory"}]
            else:
                change["filters"]["outbound"] = []
            _edit(path, change)
            status, result = _reload(payment)
            assert (status, result["result"]) == (200, "ok"), result
            sha = result["sha256"]
            if i % 3 == 0:  # the callee's sidecar too: its inbound chain changes
                stamp = {"response_headers_to_set": {"x-inbound": f"v{i}"}}
                inbound = {"inbound": [{"name": "headers", "config": stamp}]}
                _edit(_config(inventory), {"filters": inbound})
                assert _reload(inventory)[1]["result"] == "ok"
            # Visible to the next call at once.
            resp = httpx.get(url, timeout=10)
            assert resp.headers.get("x-version") == (f"v{i}" if i % 2 else None)
            if i % 3 == 0:
                assert resp.headers["x-inbound"] == f"v{i}"
            while len(versions) < seen + 20 and not failures:  # calls under each config
                time.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len(versions) > 300
    # Each change was visible to the calls after it: the last stamped config answered.
    assert {"v0", "v1", "v19"} <= set(versions), sorted(set(versions))
    assert payment.metric("opus_config_reloads_total", result="ok") == 16
    assert payment.metric("opus_config_reloads_total", result="invalid") == 4
    assert inventory.metric("opus_config_reloads_total", result="ok") == 5


def test_invalid_and_restart_only_configs_are_refused(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {**_stamp("v0"), "reload": {"watch": False}})
    path = _config(payment)
    good = path.read_text()
    before = _dump(payment)["config_version"]

    _edit(path, {"limits": {"max_header_bytes": -1}})
    status, result = _reload(payment)
    assert status == 422 and "limits.max_header_bytes" in result["error"], result

    path.write_text(good)
    _edit(path, {"workers": 2, "service": {"name": "other", "instance_id": "x"}, **_stamp("v1")})
    status, result = _reload(payment)
    assert status == 409 and result["result"] == "refused", result
    for key in ("workers", "service.name", "service.instance_id"):
        assert f"{key} cannot change without a restart" in result["error"]

    # The old config still serves, and /config_dump says which version runs.
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", timeout=10)
    assert resp.status_code == 200 and resp.headers["x-version"] == "v0"
    dumped = _dump(payment)
    assert dumped["config_version"] == before
    assert dumped["last_reload"]["result"] == "refused"
    assert payment.metric("opus_config_reloads_total", result="refused") == 1
    assert payment.metric("opus_config_reloads_total", result="invalid") == 1
    assert "cannot change without a restart" in payment.output()
    path.write_text(good)


def test_pooled_connection_survives_a_reload_not_touching_its_cluster(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {"reload": {"watch": False}})
    url = f"{payment.outbound}/v1/invoke/inventory/pool"
    with httpx.Client(timeout=10) as client:
        assert client.get(url).status_code == 200
        opened = payment.metric("opus_upstream_connections_opened_total", service="inventory")
        assert opened >= 1
        path = _config(payment)
        _edit(path, {**_stamp("v1"), "services": {"other": {"lb_policy": "least_request"}}})
        assert _reload(payment)[1]["clusters_replaced"] == []
        for _ in range(20):
            resp = client.get(url)
            assert resp.status_code == 200 and resp.headers["x-version"] == "v1"
        assert (
            payment.metric("opus_upstream_connections_opened_total", service="inventory") == opened
        )
        # A change to the cluster itself replaces it (and so its pool).
        _edit(path, {"services": {"inventory": {"max_connections": 7, "max_per_route": 3}}})
        assert _reload(payment)[1]["clusters_replaced"] == ["inventory"]
        assert client.get(url).status_code == 200
        assert (
            payment.metric("opus_upstream_connections_opened_total", service="inventory") > opened
        )


def test_a_moved_listener_is_rebound(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {"reload": {"watch": False}})
    old = payment.ports["outbound"]
    port = _free_port()
    _edit(_config(payment), {"listeners": {**_listeners(payment), "outbound": _at(port)}})
    status, result = _reload(payment)
    assert (status, result["rebound"]) == (200, {"outbound": port}), result
    resp = httpx.get(f"http://127.0.0.1:{port}/v1/invoke/inventory/x", timeout=10)
    assert resp.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{old}/v1/invoke/inventory/x", timeout=5)
    assert httpx.get(payment.admin + "/ready", timeout=5).status_code == 200


def _listeners(sidecar: Sidecar) -> dict[str, Any]:
    listeners: dict[str, Any] = yaml.safe_load(_config(sidecar).read_text())["listeners"]
    return listeners


def _at(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port}


def test_sighup_reloads(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {**_stamp("v0"), "reload": {"watch": False}})
    _edit(_config(payment), {**_stamp("v1"), "reload": {"watch": False}})
    payment.signal(signal.SIGHUP)
    dumped = _wait_for_reload(payment, "sighup", 1)
    assert dumped["last_reload"]["result"] == "ok"
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", timeout=10)
    assert resp.headers["x-version"] == "v1"
    assert payment.proc.poll() is None


def test_the_watched_file_replaced_by_rename(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {**_stamp("v0"), "reload": {"poll_interval": 0.05}})
    _edit(_config(payment), _stamp("v1"))
    dumped = _wait_for_reload(payment, "file", 1)
    assert dumped["last_reload"]["result"] == "ok"
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", timeout=10)
    assert resp.headers["x-version"] == "v1"


def test_a_configmap_data_symlink_swap_is_a_change(mesh: Mesh, tmp_path: Path) -> None:
    """The layout the kubelet gives a ConfigMap volume: `config.yaml -> ..data/config.yaml`,
    `..data -> ..<timestamp>/`; an update writes a new timestamped directory and renames a
    new `..data` symlink over the old one."""
    mesh.service("inventory")
    _, seed = mesh.service("payment", {**_stamp("v0"), "reload": {"poll_interval": 0.05}})
    seed.stop()
    volume = tmp_path / "configmap"
    (volume / "..v0").mkdir(parents=True)
    os.replace(_config(seed), volume / "..v0" / "config.yaml")
    (volume / "..data").symlink_to("..v0")
    (volume / "config.yaml").symlink_to("..data/config.yaml")
    payment = Sidecar(
        "payment-cm",
        [sys.executable, "-m", "sidecar", "run", "--config", str(volume / "config.yaml")],
        tmp_path,
        None,
    )
    mesh.procs.append(payment)
    payment.wait_ready()
    (volume / "..v1").mkdir()
    _edit(volume / "config.yaml", _stamp("v1"), target=volume / "..v1" / "config.yaml")
    (volume / "..data_tmp").symlink_to("..v1")
    os.replace(volume / "..data_tmp", volume / "..data")
    dumped = _wait_for_reload(payment, "file", 1)
    assert dumped["last_reload"]["result"] == "ok"
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", timeout=10)
    assert resp.headers["x-version"] == "v1"


def test_two_workers_both_switch(mesh: Mesh) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment", {**_stamp("v0"), "workers": 2, "reload": {"watch": False}})
    _edit(_config(payment), {**_stamp("v1"), "workers": 2, "reload": {"watch": False}})
    status, result = _reload(payment)
    assert status == 200, result
    assert {w: r["result"] for w, r in result["workers"].items()} == {"0": "ok", "1": "ok"}
    workers = httpx.get(f"{payment.admin}/clusters", timeout=5).json()["workers"]
    for worker in workers:
        dumped = httpx.get(f"http://{worker['admin']}/config_dump", timeout=5).json()
        assert dumped["config_version"]["sha256"] == result["sha256"]
    for _ in range(40):  # a new connection per call: both workers answer, both with v1
        resp = httpx.get(
            f"{payment.outbound}/v1/invoke/inventory/w",
            headers={"connection": "close"},
            timeout=10,
        )
        assert resp.status_code == 200 and resp.headers["x-version"] == "v1"
    assert _dump(payment)["config_version"]["sha256"] == result["sha256"]
    assert payment.metric("opus_config_reloads_total", result="ok") == 1
    # A listener move is refused under workers (the supervisor holds the ports).
    _edit(_config(payment), {"listeners": {**_listeners(payment), "outbound": _at(1)}})
    status, result = _reload(payment)
    assert status == 409 and "listeners.outbound.port" in result["error"], result


def test_an_unchanged_inbound_chain_keeps_its_state(mesh: Mesh) -> None:
    """filters.inbound as it was: the chain, and its filters' state (a rate limit's
    bucket here; hmac_verify's replay cache in earnest), carries over a reload."""
    limited: dict[str, Any] = {
        "inbound": [{"name": "rate_limit", "config": {"rate": 0.001, "burst": 3}}]
    }
    _, inventory = mesh.service("inventory", {"filters": limited, "reload": {"watch": False}})
    url = f"{inventory.inbound}/x"
    assert [httpx.get(url, timeout=10).status_code for _ in range(4)] == [200, 200, 200, 429]
    _edit(_config(inventory), {"drain_timeout": 4.0})
    assert _reload(inventory)[1]["result"] == "ok"
    assert httpx.get(url, timeout=10).status_code == 429  # the same bucket, still empty
    limited["inbound"][0]["config"]["burst"] = 4
    _edit(_config(inventory), {"filters": limited})
    assert _reload(inventory)[1]["result"] == "ok"
    assert httpx.get(url, timeout=10).status_code == 200  # a new chain, a new bucket


def _change(i: int) -> dict[str, Any]:
    """The i-th of the hundred changes: the stamp (the outbound chain) always; a second
    filter on odd i, gone on even; a legacy route shifted; the split's weight moved."""
    change = _stamp(f"v{i}")
    if i % 2:
        extra = {"request_headers_to_set": {"x-extra": str(i)}}
        change["filters"]["outbound"].append({"name": "headers", "config": extra})
    change["routes"] = [{"prefix": f"/r{i % 7}", "service": "inventory"}]
    weight = (i * 37) % 101
    change["route_rules"] = [
        {
            "name": "split",
            "match": {"path": {"prefix": "/v1/invoke/inventory/"}},
            "destinations": [
                {"service": "inventory", "weight": weight},
                {"service": "stock", "weight": 100 - weight},
            ],
        }
    ]
    return change


def test_a_hundred_watched_changes_under_load(mesh: Mesh) -> None:
    """Issue 18's figure: 100 changes of the watched file (routes shifted, a filter added
    and removed, a weight moved) while two keep-alive callers run through two sidecars:
    no failed call, no reset, each change answering within 1 s of its write; 20 invalid
    files in between, each refused with the running config untouched."""
    mesh.service("inventory")
    mesh.service("stock")
    watch = {"reload": {"watch": True, "poll_interval": 0.05}}
    _, payment = mesh.service("payment", {**_stamp("v0"), **watch})
    mesh.wait_endpoints(payment, "inventory", 1)
    mesh.wait_endpoints(payment, "stock", 1)
    url = f"{payment.outbound}/v1/invoke/inventory/load"
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set() and calls[0] < 100_000:
                try:
                    resp = client.get(url)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                calls[0] += 1
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    path = _config(payment)
    took: list[float] = []
    invalid = 0
    try:
        with httpx.Client(timeout=10) as probe:
            for i in range(1, 121):
                if i % 6 == 0:  # 20 invalid files: refused, the running config untouched
                    good, sha = path.read_text(), _dump(payment)["config_version"]["sha256"]
                    _edit(path, {"upstream": {"max_per_route": "many"}})
                    deadline = time.monotonic() + VISIBLE_WITHIN
                    while _dump(payment)["last_reload"].get("result") != "invalid":
                        assert time.monotonic() < deadline, "the invalid file was not seen"
                        time.sleep(0.02)
                    dumped = _dump(payment)
                    assert "upstream.max_per_route" in dumped["last_reload"]["error"]
                    assert dumped["config_version"]["sha256"] == sha
                    assert probe.get(url).headers.get("x-version") == f"v{i - 1}"
                    invalid += 1
                    path.write_text(good)  # the running config again: nothing to change
                    _edit(path, _change(i))  # and this step's change, as the others
                else:
                    _edit(path, _change(i))
                written = time.monotonic()
                while probe.get(url).headers.get("x-version") != f"v{i}":
                    assert time.monotonic() - written < VISIBLE_WITHIN, f"change {i} not seen"
                took.append(time.monotonic() - written)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert invalid == 20 and len(took) == 120  # 100 valid changes, 20 more after refusals
    assert max(took) <= 1.0, sorted(took)[-5:]
    assert calls[0] > 500
    assert payment.metric("opus_config_reloads_total", result="invalid") == 20
    assert payment.metric("opus_config_reloads_total", result="ok") >= 120
    # The weight moved: both destinations were sent calls by the split.
    assert payment.metric("opus_route_requests_total", route="split", service="stock") > 0
    assert payment.metric("opus_route_requests_total", route="split", service="inventory") > 0
