"""The file backend, driven through `scan_once()` with a fake clock.

The few tests that exercise the background tasks use short intervals and wait
on a real condition with a deadline, never on a bare sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sidecar.discovery.file as file_backend
from sidecar.config import DiscoveryConfig, FileDiscoveryConfig, SidecarConfig
from sidecar.discovery.base import Endpoint, Instance
from sidecar.discovery.factory import create_discovery
from sidecar.discovery.file import FileDiscovery

# Heartbeats and polls that never fire during a test unless it asks for them.
QUIET = FileDiscoveryConfig(heartbeat_interval=3600.0, ttl=1.0, poll_interval=3600.0)
ORDERS_1 = Instance(
    "orders", "orders-1", "10.0.0.1", 15006, zone="a", tags=("v1",), meta={"k": "v"}
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


Heard = list[tuple[str, tuple[Endpoint, ...]]]


def recorder(discovery: FileDiscovery, service: str) -> Heard:
    heard: Heard = []
    discovery.subscribe(service, lambda s, eps: heard.append((s, eps)))
    return heard


def put_record(root: Path, service: str, instance_id: str, **fields: Any) -> Path:
    record = {"service": service, "instance_id": instance_id, "host": "10.0.0.9", "port": 80}
    record.update(fields)
    (root / service).mkdir(parents=True, exist_ok=True)
    path = root / service / f"{instance_id}.json"
    path.write_text(json.dumps(record))
    return path


async def wait_until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a real condition, with a deadline so a bug fails the test instead of hanging it."""
    async with asyncio.timeout(limit):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


def test_register_writes_record(tmp_path: Path) -> None:
    async def main() -> None:
        discovery = FileDiscovery(QUIET, str(tmp_path), now=FakeClock(1234.5))
        await discovery.register(ORDERS_1)
        record = json.loads((tmp_path / "orders" / "orders-1.json").read_text())
        assert record == {
            "service": "orders",
            "instance_id": "orders-1",
            "host": "10.0.0.1",
            "port": 15006,
            "zone": "a",
            "protocol": "h2c",
            "tags": ["v1"],
            "meta": {"k": "v"},
            "ttl": 1.0,
            "updated": 1234.5,
            "pid": os.getpid(),
        }
        # The temp file was renamed into place, not left behind.
        assert os.listdir(tmp_path / "orders") == ["orders-1.json"]
        await discovery.close()

    asyncio.run(main())


def test_another_sidecar_sees_the_record(tmp_path: Path) -> None:
    clock = FakeClock()

    async def main() -> None:
        owner = FileDiscovery(QUIET, str(tmp_path), now=clock)
        await owner.register(ORDERS_1)
        watcher = FileDiscovery(QUIET, str(tmp_path), now=clock)
        await watcher.start()  # start() scans before returning
        assert watcher.services() == frozenset({"orders"})
        assert watcher.endpoints("orders") == (
            Endpoint("10.0.0.1", 15006, zone="a", instance_id="orders-1"),
        )
        assert watcher.endpoints("payments") is None
        await watcher.close()
        await owner.close()

    asyncio.run(main())


def test_record_expires_after_its_ttl(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    put_record(tmp_path, "orders", "short", updated=1000.0, ttl=1.0, host="10.0.0.1")
    put_record(tmp_path, "orders", "long", updated=1000.0, ttl=5.0, host="10.0.0.2")
    put_record(tmp_path, "orders", "default", updated=1000.0, host="10.0.0.3")
    discovery = FileDiscovery(FileDiscoveryConfig(ttl=2.0), str(tmp_path), now=clock)

    def hosts() -> list[str]:
        return [ep.host for ep in discovery.endpoints("orders") or ()]

    discovery.scan_once()
    assert hosts() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    clock.t = 1001.5  # past the record's own ttl of 1 s
    discovery.scan_once()
    assert hosts() == ["10.0.0.2", "10.0.0.3"]
    clock.t = 1002.5  # past the config's default of 2 s, for the record without one
    discovery.scan_once()
    assert hosts() == ["10.0.0.2"]
    clock.t = 1005.5
    discovery.scan_once()
    assert hosts() == []
    assert discovery.services() == frozenset({"orders"})


def test_notify_fires_only_on_change(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    discovery = FileDiscovery(QUIET, str(tmp_path), now=clock)
    heard = recorder(discovery, "orders")
    put_record(tmp_path, "orders", "a", updated=1000.0, host="10.0.0.1")

    discovery.scan_once()
    discovery.scan_once()
    a = Endpoint("10.0.0.1", 80, instance_id="a")
    assert heard == [("orders", (a,))]

    put_record(tmp_path, "orders", "b", updated=1000.0, host="10.0.0.2")
    discovery.scan_once()
    discovery.scan_once()
    b = Endpoint("10.0.0.2", 80, instance_id="b")
    assert heard[1:] == [("orders", (a, b))]

    # A heartbeat that only moves `updated` changes nothing anyone can see.
    put_record(tmp_path, "orders", "b", updated=1000.5, host="10.0.0.2")
    discovery.scan_once()
    assert len(heard) == 2

    clock.t = 1001.2  # a expires; b (updated 1000.5) is still live
    discovery.scan_once()
    assert heard[2:] == [("orders", (b,))]


def test_deregister_removes_record_and_watchers_see_service_empty(tmp_path: Path) -> None:
    clock = FakeClock()

    async def main() -> None:
        owner = FileDiscovery(QUIET, str(tmp_path), now=clock)
        watcher = FileDiscovery(QUIET, str(tmp_path), now=clock)
        heard = recorder(watcher, "orders")
        await owner.register(ORDERS_1)
        watcher.scan_once()
        await owner.deregister()
        assert not (tmp_path / "orders" / "orders-1.json").exists()
        watcher.scan_once()
        assert [eps for _, eps in heard] == [
            (Endpoint("10.0.0.1", 15006, zone="a", instance_id="orders-1"),),
            (),
        ]
        assert watcher.services() == frozenset({"orders"})
        assert watcher.endpoints("orders") == ()
        await owner.deregister()  # a second call is harmless
        await owner.close()

    asyncio.run(main())


def test_malformed_records_are_skipped(tmp_path: Path) -> None:
    put_record(tmp_path, "orders", "good", updated=1000.0)
    orders = tmp_path / "orders"
    (orders / "broken.json").write_text('{"host": "10.0.0.1", "po')  # half a record
    (orders / "list.json").write_text("[1, 2]")
    (orders / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    put_record(tmp_path, "orders", "no-port", updated=1000.0, port=None)
    put_record(tmp_path, "orders", "bad-port", updated=1000.0, port=70000)
    put_record(tmp_path, "orders", "no-updated")
    put_record(tmp_path, "orders", "bad-ttl", updated=1000.0, ttl=-1)
    (orders / ".good.123.tmp").write_text("{}")  # a write in flight
    (orders / "README").write_text("not a record")
    discovery = FileDiscovery(QUIET, str(tmp_path), now=FakeClock(1000.0))
    discovery.scan_once()
    assert discovery.endpoints("orders") == (Endpoint("10.0.0.9", 80, instance_id="good"),)


def test_unchanged_files_are_not_reread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real_parse = file_backend.parse_record

    def counting_parse(data: bytes, **kwargs: Any) -> Any:
        parsed.append(data)
        return real_parse(data, **kwargs)

    monkeypatch.setattr(file_backend, "parse_record", counting_parse)
    clock = FakeClock(1000.0)
    put_record(tmp_path, "orders", "a", updated=1000.0)
    discovery = FileDiscovery(QUIET, str(tmp_path), now=clock)
    discovery.scan_once()
    discovery.scan_once()
    assert len(parsed) == 1
    # Expiry is still judged every scan, from the cached record.
    clock.t = 1002.0
    discovery.scan_once()
    assert len(parsed) == 1
    assert discovery.endpoints("orders") == ()
    put_record(tmp_path, "orders", "a", updated=1002.0, port=81)
    discovery.scan_once()
    assert len(parsed) == 2
    assert discovery.endpoints("orders") == (Endpoint("10.0.0.9", 81, instance_id="a"),)


def test_long_dead_records_are_collected(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    dead = put_record(tmp_path, "orders", "crashed", updated=1000.0, ttl=1.0)
    discovery = FileDiscovery(QUIET, str(tmp_path), now=clock)
    clock.t = 1010.0  # expired, but not for 10 ttls yet
    discovery.scan_once()
    assert dead.exists()
    clock.t = 1011.5
    discovery.scan_once()
    assert not dead.exists()
    assert discovery.services() == frozenset({"orders"})


def test_removed_service_directory_notifies_empty(tmp_path: Path) -> None:
    path = put_record(tmp_path, "orders", "a", updated=1000.0)
    discovery = FileDiscovery(QUIET, str(tmp_path), now=FakeClock(1000.0))
    heard = recorder(discovery, "orders")
    discovery.scan_once()
    path.unlink()
    path.parent.rmdir()
    discovery.scan_once()
    assert [eps for _, eps in heard][1:] == [()]
    assert discovery.endpoints("orders") is None
    assert discovery.services() == frozenset()


def test_missing_directory_is_an_empty_registry(tmp_path: Path) -> None:
    discovery = FileDiscovery(QUIET, str(tmp_path / "not-yet"), now=FakeClock())
    discovery.scan_once()
    assert discovery.services() == frozenset()


@pytest.mark.parametrize("instance_id", ["", ".hidden", "a/b", "..", "nul\0"])
def test_register_rejects_names_that_are_not_file_names(tmp_path: Path, instance_id: str) -> None:
    async def main() -> None:
        discovery = FileDiscovery(QUIET, str(tmp_path))
        with pytest.raises(ValueError, match="instance_id"):
            await discovery.register(Instance("orders", instance_id, "10.0.0.1", 1))
        await discovery.close()

    asyncio.run(main())


def test_heartbeat_refreshes_updated(tmp_path: Path) -> None:
    record_path = tmp_path / "orders" / "orders-1.json"
    ticks = iter(range(1000, 10**6))

    def read_updated() -> float:
        return float(json.loads(record_path.read_text())["updated"])

    async def main() -> None:
        config = FileDiscoveryConfig(heartbeat_interval=0.005, poll_interval=3600.0)
        discovery = FileDiscovery(config, str(tmp_path), now=lambda: float(next(ticks)))
        await discovery.register(ORDERS_1)
        assert read_updated() == 1000.0
        await wait_until(lambda: read_updated() >= 1003.0)
        await discovery.close()  # close() stops heartbeats but leaves the record
        assert record_path.exists()

    asyncio.run(main())


def test_heartbeat_survives_a_failed_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def flaky_now() -> float:
        # The second write (the first heartbeat) fails; later ones succeed.
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk on fire")
        return 1000.0 + calls

    async def main() -> None:
        config = FileDiscoveryConfig(heartbeat_interval=0.005, poll_interval=3600.0)
        discovery = FileDiscovery(config, str(tmp_path), now=flaky_now)
        await discovery.register(ORDERS_1)
        await wait_until(lambda: calls >= 4)
        await discovery.close()

    with caplog.at_level("INFO", logger="sidecar.discovery"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.discovery"]
    assert "registry heartbeat write failed; retrying" in messages
    assert "registry heartbeat write recovered" in messages
    updated = json.loads((tmp_path / "orders" / "orders-1.json").read_text())["updated"]
    assert updated >= 1003.0


def test_poll_task_delivers_changes(tmp_path: Path) -> None:
    async def main() -> None:
        config = FileDiscoveryConfig(heartbeat_interval=3600.0, poll_interval=0.005)
        watcher = FileDiscovery(config, str(tmp_path))
        heard = recorder(watcher, "orders")
        await watcher.start()
        assert watcher.endpoints("orders") is None
        owner = FileDiscovery(config, str(tmp_path))
        await owner.register(ORDERS_1)
        await wait_until(lambda: bool(heard) and heard[-1][1] != ())
        await owner.deregister()
        await wait_until(lambda: heard[-1][1] == ())
        await watcher.close()
        await owner.close()

    asyncio.run(main())


def test_factory_builds_file_backend(tmp_path: Path) -> None:
    explicit = SidecarConfig(
        discovery=DiscoveryConfig(file=FileDiscoveryConfig(directory=str(tmp_path)))
    )
    discovery = create_discovery(explicit)
    assert isinstance(discovery, FileDiscovery)
    assert discovery.directory == str(tmp_path)
    default = create_discovery(SidecarConfig())
    assert isinstance(default, FileDiscovery)
    assert default.directory.endswith(os.path.join("opus-mesh", "registry"))
