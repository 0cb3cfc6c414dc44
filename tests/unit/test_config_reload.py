"""Live configuration in-process: the plan (what changes, what is refused, naming keys),
the file watch's change detection, and one reload's outcome and bookkeeping."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import (
    ClusterOverride,
    ListenerConfig,
    RouteConfig,
    SidecarConfig,
    cluster_settings,
    load_config,
)
from sidecar.config.live import MAX_NAMED, ReloadPlan, changed_keys, plan_reload
from sidecar.reload import FileWatch, LiveConfig, ReloadRefused, digest
from tests.unit.faketime import run_virtual

BASE = SidecarConfig()


def _with(**changes: Any) -> SidecarConfig:
    return dataclasses.replace(BASE, **changes)


def test_an_equal_config_changes_nothing() -> None:
    plan = plan_reload(BASE, SidecarConfig(), ["inventory"])
    assert plan == ReloadPlan((), (), (), ())
    assert plan.unchanged


def test_routes_and_filters_change_live_and_keep_every_cluster() -> None:
    new = _with(
        routes=(RouteConfig(service="inventory", prefix="/stock"),),
        services={"inventory": ClusterOverride(filters=())},
    )
    plan = plan_reload(BASE, new, ["inventory", "payment"])
    assert plan.refused == ()
    assert plan.clusters == ()  # filters are not the cluster's: its pool is kept
    assert plan.changed == ("routes", "services.inventory")


def test_a_cluster_whose_settings_change_is_replaced_and_only_it() -> None:
    new = _with(services={"inventory": ClusterOverride(max_connections=7)})
    plan = plan_reload(BASE, new, ["inventory", "payment"])
    assert plan.clusters == ("inventory",)
    upstream = dataclasses.replace(BASE.upstream, idle_timeout=5.0)
    assert plan_reload(BASE, _with(upstream=upstream), ["b", "a"]).clusters == ("a", "b")


def test_cluster_settings_apply_the_service_override() -> None:
    cfg = _with(services={"inventory": ClusterOverride(lb_policy="least_request")})
    assert cluster_settings(cfg, "inventory").lb_policy == "least_request"
    assert cluster_settings(cfg, "payment").lb_policy == "round_robin"
    assert cluster_settings(cfg, "payment") == cluster_settings(BASE, "payment")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"workers": 2}, "workers"),
        ({"service": dataclasses.replace(BASE.service, name="other")}, "service.name"),
        ({"app": dataclasses.replace(BASE.app, port=9001)}, "app.port"),
        (
            {"listeners": dataclasses.replace(BASE.listeners, admin=ListenerConfig("::1", 1))},
            "listeners.admin.host",
        ),
        ({"discovery": dataclasses.replace(BASE.discovery, backend="static")}, "discovery.backend"),
        ({"log": dataclasses.replace(BASE.log, access_log="")}, "log.access_log"),
        ({"limits": dataclasses.replace(BASE.limits, fd_reserve=9)}, "limits.fd_reserve"),
    ],
)
def test_what_needs_a_restart_is_refused_by_name(changes: dict[str, Any], key: str) -> None:
    plan = plan_reload(BASE, _with(**changes))
    assert len(plan.refused) >= 1
    assert plan.refused[0].startswith(f"{key} cannot change without a restart: ")


def test_tls_settings_and_an_mtls_inbound_listener_need_a_restart() -> None:
    """(mTLS: the mode, trust domain and source are set at start, the certificates
    themselves rotate live; an mTLS listener is bound once. A service's expected
    identity changes live and replaces its cluster, so no connection verified against
    the old identity is reused.)"""
    tls = dataclasses.replace(BASE.tls, mode="strict", trust_domain="example.org")
    plan = plan_reload(BASE, _with(tls=tls))
    assert plan.refused[0].startswith("tls.mode cannot change without a restart: ")
    identity = {"inventory": ClusterOverride(identity="spiffe://example.org/svc/x")}
    plan = plan_reload(BASE, _with(services=identity), ["inventory", "payment"])
    assert plan.refused == () and plan.clusters == ("inventory",)
    running = _with(tls=tls)
    moved = dataclasses.replace(BASE.listeners, inbound=ListenerConfig("127.0.0.1", 1))
    plan = plan_reload(running, dataclasses.replace(running, listeners=moved))
    assert "cannot change without a restart: an mTLS listener" in plan.refused[0]
    moved_out = dataclasses.replace(BASE.listeners, outbound=ListenerConfig("127.0.0.1", 1))
    assert plan_reload(running, dataclasses.replace(running, listeners=moved_out)).refused == ()


def test_live_keys_are_not_refused() -> None:
    new = _with(
        drain_timeout=1.0,
        log=dataclasses.replace(BASE.log, level="DEBUG"),
        limits=dataclasses.replace(BASE.limits, idle_timeout=5.0),
        http2=dataclasses.replace(BASE.http2, max_concurrent_streams=10),
        upstream=dataclasses.replace(BASE.upstream, protocol="http1"),
    )
    plan = plan_reload(BASE, new, ["inventory"])
    assert plan.refused == ()
    assert plan.clusters == ("inventory",)
    assert "log.level" in plan.changed and "limits.idle_timeout" in plan.changed


def test_a_moved_listener_is_rebound_unless_under_workers() -> None:
    listeners = dataclasses.replace(BASE.listeners, outbound=ListenerConfig("127.0.0.1", 18080))
    new = _with(listeners=listeners)
    plan = plan_reload(BASE, new)
    assert (plan.rebind, plan.refused) == (("outbound",), ())
    refused = plan_reload(BASE, new, workers=True).refused
    assert refused == (
        "listeners.outbound.port cannot change without a restart: the supervisor reserved "
        "the data ports at start (workers > 1)",
    )


def test_a_long_refusal_names_the_first_keys_and_counts_the_rest() -> None:
    meta = {f"k{i}": "v" for i in range(MAX_NAMED + 5)}
    new = _with(service=dataclasses.replace(BASE.service, meta=meta))
    refused = plan_reload(BASE, new).refused
    assert len(refused) == MAX_NAMED + 1
    assert refused[-1] == "and 5 more"


def test_changed_keys_walk_mappings_and_equal_length_lists() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "d": [1]}
    new = {"a": {"b": 2, "c": [1, 3]}, "d": [1, 2], "e": 0}
    assert changed_keys(old, new) == ["a.b", "a.c[1]", "d", "e"]


class FakeStat:
    def __init__(self) -> None:
        self.result: os.stat_result | None = os.stat_result((0o100644, 1, 1, 1, 0, 0, 10, 0, 0, 0))

    def __call__(self, path: str) -> os.stat_result:
        if self.result is None:
            raise FileNotFoundError(path)
        return self.result

    def become(self, ino: int, size: int = 10, mtime_ns: int = 0) -> None:
        # st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size, atime, mtime, ctime
        fields = (0o100644, ino, 1, 1, 0, 0, size, 0, 0, 0)
        self.result = os.stat_result(fields, {"st_mtime_ns": mtime_ns})


def test_file_watch_sees_a_rename_a_rewrite_and_a_moment_missing() -> None:
    stat = FakeStat()
    watch = FileWatch("/cfg/config.yaml", stat)
    assert not watch.changed()
    stat.become(ino=2)  # renamed over, or `..data` swapped: another inode
    assert watch.changed()
    assert not watch.changed()  # seen once
    stat.result = None  # between the unlink and the rename
    assert not watch.changed()
    stat.become(ino=2, size=11)  # rewritten in place
    assert watch.changed()
    stat.become(ino=2, size=11, mtime_ns=5)
    watch.seen()  # a reload read it (SIGHUP): the watch does not reload it again
    assert not watch.changed()


def test_the_file_watch_follows_a_symlink_swap(tmp_path: Path) -> None:
    for version in ("..v1", "..v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "config.yaml").write_text(f"# {version}\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "config.yaml").symlink_to("..data/config.yaml")
    watch = FileWatch(str(tmp_path / "config.yaml"))
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watch.changed()


class Owner:
    """What LiveConfig's owner does, recorded: its running config and what it applied."""

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.applied: list[ReloadPlan] = []
        self.counted: list[str] = []
        self.refuse: str | None = None

    def plan(self, new: SidecarConfig) -> ReloadPlan:
        return plan_reload(self.cfg, new)

    async def apply(self, new: SidecarConfig, plan: ReloadPlan) -> dict[str, Any]:
        if self.refuse:
            raise ReloadRefused(self.refuse)
        self.applied.append(plan)
        self.cfg = new
        return {"applied": True}


def _live(path: Path, owner: Owner) -> LiveConfig:
    return LiveConfig(
        str(path),
        lambda: owner.cfg,
        owner.plan,
        owner.apply,
        owner.counted.append,
        wall_clock=lambda: 1_700_000_000.0,
    )


def _write(path: Path, doc: dict[str, Any]) -> bytes:
    data = yaml.safe_dump(doc).encode()
    path.write_bytes(data)
    return data


def test_a_reload_applies_a_valid_change_and_records_its_version(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    first = _write(path, {"drain_timeout": 3})
    owner = Owner(load_config(str(path), {}))
    live = _live(path, owner)
    assert live.dump()["config_version"]["sha256"] == digest(first)
    second = _write(path, {"drain_timeout": 4})
    result = asyncio.run(live.reload("admin"))
    assert result["result"] == "ok" and result["changed"] == ["drain_timeout"]
    assert result["applied"] is True and result["trigger"] == "admin"
    assert owner.cfg.drain_timeout == 4.0
    version = live.dump()["config_version"]
    assert version == {
        "sha256": digest(second),
        "loaded_at": "2023-11-14T22:13:20Z",
        "path": str(path),
        "generation": 1,
    }
    # The same file again: nothing to apply, still ok.
    assert asyncio.run(live.reload("sighup"))["changed"] == []
    assert len(owner.applied) == 1 and owner.counted == ["ok", "ok"]


def test_an_invalid_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    first = _write(path, {})
    owner = Owner(load_config(str(path), {}))
    live = _live(path, owner)
    _write(path, {"upstream": {"max_per_route": 0}})
    result = asyncio.run(live.reload("file"))
    assert (result["result"], result["key"]) == ("invalid", "upstream.max_per_route")
    assert "config key 'upstream.max_per_route'" in result["error"]
    path.write_text("routes: [unclosed\n")
    result = asyncio.run(live.reload("file"))
    assert result["result"] == "invalid" and "invalid YAML" in result["error"]
    assert owner.applied == [] and owner.counted == ["invalid", "invalid"]
    assert live.dump()["config_version"]["sha256"] == digest(first)
    assert live.dump()["last_reload"]["result"] == "invalid"


def test_a_restart_only_change_or_a_failed_apply_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    first = _write(path, {})
    owner = Owner(load_config(str(path), {}))
    live = _live(path, owner)
    _write(path, {"workers": 3})
    result = asyncio.run(live.reload("admin"))
    assert result["result"] == "refused"
    assert result["error"].startswith("workers cannot change without a restart")
    _write(path, {"drain_timeout": 1})
    owner.refuse = "config key 'listeners.outbound': cannot bind 127.0.0.1:1: denied"
    result = asyncio.run(live.reload("admin"))
    assert (result["result"], result["error"]) == ("refused", owner.refuse)
    assert owner.applied == [] and owner.counted == ["refused", "refused"]
    assert live.dump()["config_version"]["sha256"] == digest(first)


def test_without_a_file_there_is_nothing_to_reload() -> None:
    owner = Owner(BASE)
    live = LiveConfig(None, lambda: owner.cfg, owner.plan, owner.apply)
    result = asyncio.run(live.reload("sighup"))
    assert result["result"] == "invalid" and "--config" in result["error"]
    assert live.dump()["config_version"]["sha256"] == ""


def test_the_watch_reloads_a_replaced_file_and_stops_when_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    _write(path, {"reload": {"poll_interval": 0.1}})
    owner = Owner(load_config(str(path), {}))
    live = _live(path, owner)

    async def go() -> None:
        live.start(watch=True, sighup=False)
        await asyncio.sleep(1.0)  # polls, nothing changed
        assert owner.counted == []
        replacement = tmp_path / "new.yaml"
        _write(replacement, {"reload": {"poll_interval": 0.1, "watch": False}})
        os.replace(replacement, path)  # a rename over it: another inode
        await asyncio.sleep(1.0)
        assert owner.counted == ["ok"] and live.last is not None
        assert live.last["trigger"] == "file" and live.last["changed"] == ["reload.watch"]
        _write(path, {"drain_timeout": 2})  # not watched any more
        await asyncio.sleep(1.0)
        assert owner.counted == ["ok"]
        live.close()

    run_virtual(go())
