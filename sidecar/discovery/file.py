"""The file backend (the default): a shared directory is the registry.

Layout: `<directory>/<service>/<instance_id>.json`, one record per instance,
written by the instance's own sidecar and rewritten every heartbeat. Every
sidecar polls the whole directory; a record whose `updated` is older than its
`ttl` belongs to a sidecar that stopped heartbeating and is left out of the
endpoint set. Works on one machine or on any volume the sidecars share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from sidecar.config import FileDiscoveryConfig
from sidecar.discovery.base import Discovery, Endpoint, Instance, endpoint_meta, same_endpoints

logger = logging.getLogger("sidecar.discovery")

RECORD_SUFFIX = ".json"
# A record this many TTLs past its expiry belongs to a sidecar that died without
# deregistering; any scanner may delete it so the directory does not grow forever.
GC_AFTER_TTLS = 10.0
# Records are a few hundred bytes; anything far bigger is not ours and not worth reading.
MAX_RECORD_BYTES = 64 * 1024
_DIR_MODE = 0o755
# Other users' sidecars on a shared volume must be able to read our record.
_FILE_MODE = 0o644


@dataclass(frozen=True, slots=True)
class _Record:
    endpoint: Endpoint
    updated: float
    ttl: float


@dataclass(frozen=True, slots=True)
class _CachedFile:
    # (inode, mtime_ns, size). Every write is a fresh file moved into place, so the
    # inode changes too; it catches rewrites that land within one mtime tick.
    stamp: tuple[int, int, int]
    record: _Record | None  # None: unreadable or malformed as of this stamp


def instance_record(instance: Instance, *, ttl: float, updated: float) -> dict[str, Any]:
    """The JSON object stored for `instance`."""
    return {
        "service": instance.service,
        "instance_id": instance.instance_id,
        "host": instance.host,
        "port": instance.port,
        "zone": instance.zone,
        "protocol": instance.protocol,
        "tags": list(instance.tags),
        "meta": dict(instance.meta),
        "ttl": ttl,
        "updated": updated,
        "pid": os.getpid(),
    }


def _finite_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_record(data: bytes, *, default_ttl: float, default_id: str) -> _Record | None:
    """The live-ness facts of one record file, or None when it is not a valid record."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    host = raw.get("host")
    port = raw.get("port")
    zone = raw.get("zone") or ""
    instance_id = raw.get("instance_id") or default_id
    updated = raw.get("updated")
    ttl = raw.get("ttl")
    if ttl is None:
        ttl = default_ttl
    if not (isinstance(host, str) and host):
        return None
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
        return None
    if not (isinstance(zone, str) and isinstance(instance_id, str)):
        return None
    if not (_finite_number(updated) and _finite_number(ttl) and ttl > 0):
        return None
    meta = endpoint_meta(raw.get("meta"), raw.get("tags"))
    endpoint = Endpoint(host=host, port=port, zone=zone, instance_id=instance_id, meta=meta)
    return _Record(endpoint=endpoint, updated=float(updated), ttl=float(ttl))


def _check_name(what: str, name: str) -> None:
    # Names become path components; a leading dot would also hide the record,
    # since scanners skip dot-files (that is where in-flight temp files live).
    if not name or name.startswith(".") or "/" in name or "\0" in name or os.sep in name:
        raise ValueError(f"{what} {name!r} cannot be used as a registry file name")


def _endpoint_order(endpoint: Endpoint) -> tuple[str, int, str, str]:
    return (endpoint.host, endpoint.port, endpoint.instance_id, endpoint.zone)


class FileDiscovery(Discovery):
    def __init__(
        self,
        config: FileDiscoveryConfig,
        directory: str,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._unreadable = False  # the registry root could not be listed last scan
        super().__init__()
        self._config = config
        self._root = directory
        self._now = now
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self._services: frozenset[str] = frozenset()
        self._files: dict[str, _CachedFile] = {}
        self._instance: Instance | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._write_failing = False

    @property
    def directory(self) -> str:
        return self._root

    async def start(self) -> None:
        if self._poll_task is not None:
            return
        os.makedirs(self._root, mode=_DIR_MODE, exist_ok=True)
        self.scan_once()
        self._poll_task = asyncio.create_task(self._poll(), name="discovery-file-poll")

    async def close(self) -> None:
        poll, self._poll_task = self._poll_task, None
        heartbeat, self._heartbeat_task = self._heartbeat_task, None
        await _stop(poll)
        await _stop(heartbeat)

    def services(self) -> frozenset[str]:
        return self._services

    def endpoints(self, service: str) -> tuple[Endpoint, ...] | None:
        return self._endpoints.get(service)

    # -- registration --------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        """Write the record now (an OSError here is raised), then keep it fresh."""
        _check_name("service", instance.service)
        _check_name("instance_id", instance.instance_id)
        if self._instance is not None:
            await self.deregister()
        self._write_record(instance)
        self._instance = instance
        self._write_failing = False
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat(instance), name="discovery-file-heartbeat"
        )

    async def deregister(self) -> None:
        instance, self._instance = self._instance, None
        heartbeat, self._heartbeat_task = self._heartbeat_task, None
        await _stop(heartbeat)
        if instance is None:
            return
        try:
            os.unlink(self._record_path(instance))
        except FileNotFoundError:
            pass
        except OSError:
            # Not fatal: without heartbeats the record expires after its ttl anyway.
            logger.warning("could not remove registry record", exc_info=True)

    def _record_path(self, instance: Instance) -> str:
        return os.path.join(self._root, instance.service, instance.instance_id + RECORD_SUFFIX)

    def _write_record(self, instance: Instance) -> None:
        service_dir = os.path.join(self._root, instance.service)
        os.makedirs(service_dir, mode=_DIR_MODE, exist_ok=True)
        record = instance_record(instance, ttl=self._config.ttl, updated=self._now())
        body = json.dumps(record, separators=(",", ":")).encode()
        # Temp file in the same directory, then rename: readers see the old record
        # or the new one, never half of one. No fsync: a record lost to a power cut
        # is rewritten by the next heartbeat, and fsync at 4 Hz is not free.
        fd, tmp = tempfile.mkstemp(
            prefix=f".{instance.instance_id}.", suffix=".tmp", dir=service_dir
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, self._record_path(instance))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def _heartbeat(self, instance: Instance) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            try:
                self._write_record(instance)
            except Exception:
                # Warn once per outage, not four times a second.
                log = logger.debug if self._write_failing else logger.warning
                log("registry heartbeat write failed; retrying", exc_info=True)
                self._write_failing = True
            else:
                if self._write_failing:
                    logger.info("registry heartbeat write recovered")
                self._write_failing = False

    # -- watch ---------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._config.poll_interval)
            try:
                self.scan_once()
            except Exception:
                logger.exception("registry scan failed")

    def refresh(self) -> None:
        self.scan_once()

    def scan_once(self) -> None:
        """Read the directory, update the endpoint sets and notify those that changed."""
        now = self._now()
        try:
            service_dirs = _list_service_dirs(self._root)
        except OSError as exc:
            # Keep serving the last known sets rather than dropping every endpoint
            # (a removed or unmounted registry is an outage, not "no services").
            if not self._unreadable:
                logger.warning(
                    "cannot list registry %s (%s): routing on the last endpoints known",
                    self._root,
                    exc,
                )
                self._unreadable = True
            return
        if self._unreadable:
            logger.warning("registry %s readable again", self._root)
            self._unreadable = False
        previous = self._endpoints
        seen_files: dict[str, _CachedFile] = {}
        current: dict[str, tuple[Endpoint, ...]] = {}
        for service, path in service_dirs:
            try:
                with os.scandir(path) as it:
                    entries = [
                        e
                        for e in it
                        if e.name.endswith(RECORD_SUFFIX) and not e.name.startswith(".")
                    ]
            except FileNotFoundError:
                continue  # removed since we listed the root: the service is gone
            except OSError:
                logger.debug("cannot list %s", path, exc_info=True)
                if service in previous:
                    current[service] = previous[service]
                continue
            live: list[Endpoint] = []
            for entry in entries:
                cached = self._load(entry)
                if cached is None:
                    continue
                seen_files[entry.path] = cached
                record = cached.record
                if record is None:
                    continue
                age = now - record.updated
                if age <= record.ttl:
                    live.append(record.endpoint)
                elif age > record.ttl * (1 + GC_AFTER_TTLS):
                    _collect(entry.path, cached.stamp)
            current[service] = tuple(sorted(live, key=_endpoint_order))
        self._files = seen_files
        # State first, then listeners: a listener that raises cannot leave it half-updated.
        self._endpoints = current
        self._services = frozenset(current)
        for service in sorted(current):
            if not same_endpoints(previous.get(service), current[service]):
                self._notify(service, current[service])
        for service in sorted(previous.keys() - current.keys()):
            self._notify(service, ())

    def _load(self, entry: os.DirEntry[str]) -> _CachedFile | None:
        try:
            st = entry.stat()
        except OSError:
            return None  # removed since the listing
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._files.get(entry.path)
        if cached is not None and cached.stamp == stamp:
            return cached
        default_id = entry.name[: -len(RECORD_SUFFIX)]
        record: _Record | None = None
        if st.st_size <= MAX_RECORD_BYTES:
            try:
                with open(entry.path, "rb") as f:
                    data = f.read(MAX_RECORD_BYTES + 1)
            except OSError:
                data = b""
            record = parse_record(data, default_ttl=self._config.ttl, default_id=default_id)
        if record is None:
            logger.debug("skipping unreadable or malformed registry record %s", entry.path)
        return _CachedFile(stamp=stamp, record=record)


def _list_service_dirs(root: str) -> list[tuple[str, str]]:
    # A missing root raises: start() creates it, so later it is an outage.
    with os.scandir(root) as it:
        return [(e.name, e.path) for e in it if not e.name.startswith(".") and _is_dir(e)]


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _collect(path: str, stamp: tuple[int, int, int]) -> None:
    """Best-effort delete of a long-dead record."""
    try:
        st = os.stat(path)
        # Rewritten since we read it: its owner is back. (A rewrite that races the
        # unlink below is healed by the owner's next heartbeat, which rewrites it.)
        if (st.st_ino, st.st_mtime_ns, st.st_size) != stamp:
            return
        os.unlink(path)
        logger.debug("collected dead registry record %s", path)
    except OSError:
        pass


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    # wait() rather than `await task`: a cancellation of our caller still propagates,
    # while the task's own CancelledError does not.
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        logger.error("discovery task failed", exc_info=task.exception())
