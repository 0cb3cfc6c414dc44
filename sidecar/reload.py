"""Live configuration: re-reading the config file while the sidecar runs.

Three triggers re-read the file: a change of it (`FileWatch`, polling its stat with
symlinks followed, so a Kubernetes ConfigMap's `..data` swap is a change), SIGHUP, and
`POST /config/reload` on the admin port. One reload runs at a time (`LiveConfig`):

  1. read the bytes (what is hashed is what is parsed), then parse and validate the
     whole config with the validator `run` and `check-config` use; invalid: stop here;
  2. plan it against the running config (`sidecar.config.live.plan_reload`); a key that
     only a restart can change: refused, naming it;
  3. apply it (the owner's `apply`, which does what can fail, binding a new port, before
     it changes anything, and raises `ReloadRefused` then);
  4. record the version (sha256 of the file, load time) for /config_dump, count the result
     (`opus_config_reloads_total{result}`) and log it.

Invalid and refused leave the running config as it was. The owner (`server.Sidecar`,
`workers.Supervisor`) decides what applying means.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sidecar.config import ConfigError, SidecarConfig, load_config_bytes
from sidecar.config.live import ReloadPlan
from sidecar.config.yamlfile import read_bytes

log = logging.getLogger("sidecar.reload")

Fingerprint = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


class ReloadRefused(Exception):
    """A valid config that cannot be applied live; the message names the key."""


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    sha256: str  # of the file's bytes; "" without a file (built-in defaults)
    loaded_at: float  # wall-clock seconds
    path: str

    def dump(self) -> dict[str, Any]:
        loaded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))
        return {"sha256": self.sha256, "loaded_at": loaded, "path": self.path}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileWatch:
    """Whether a file changed since it was last seen: its stat, symlinks followed (a
    rename over it, or a symlink swapped to another target, gives another inode)."""

    def __init__(self, path: str, stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self.path = path
        self._stat = stat
        self._seen = self._fingerprint()

    def _fingerprint(self) -> Fingerprint | None:
        try:
            st = self._stat(self.path)
        except OSError:
            return None  # missing for a moment (mid-swap), or gone: nothing to read
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def seen(self) -> None:
        """The file is being read now: later polls compare against this."""
        self._seen = self._fingerprint()

    def changed(self) -> bool:
        now = self._fingerprint()
        if now is None or now == self._seen:
            return False
        self._seen = now
        return True


Plan = Callable[[SidecarConfig], ReloadPlan]
Apply = Callable[[SidecarConfig, ReloadPlan], Awaitable[dict[str, Any] | None]]


class LiveConfig:
    """The running config's version and its reloads, for one process."""

    def __init__(
        self,
        path: str | None,
        running: Callable[[], SidecarConfig],
        plan: Plan,
        apply: Apply,
        count: Callable[[str], None] | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._running = running
        self._plan = plan
        self._apply = apply
        self._count = count
        self._wall_clock = wall_clock
        self.watch = FileWatch(path) if path else None
        data = b""
        if path:
            with contextlib.suppress(ConfigError):
                data = read_bytes(path)
        self.version = ConfigVersion(digest(data) if path else "", wall_clock(), path or "")
        self.last: dict[str, Any] | None = None
        self.generation = 0  # reloads applied
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False  # the file watch runs in this process (not in a worker)
        self._timer: asyncio.TimerHandle | None = None

    def dump(self) -> dict[str, Any]:
        """What /config_dump shows beside the config."""
        return {
            "config_version": {**self.version.dump(), "generation": self.generation},
            "last_reload": self.last,
        }

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Re-read, check, plan and apply the file; the outcome as JSON-able data."""
        async with self._lock:
            try:
                result = await self._reload()
            finally:
                self._arm()  # `reload.watch` may have changed; a file-triggered poll resumes
        result["trigger"] = trigger
        result["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._wall_clock()))
        self.last = result
        if self._count is not None:
            self._count(result["result"])
        if result["result"] == "ok":
            log.info(
                "config reloaded (%s): sha256 %s, changed: %s",
                trigger,
                self.version.sha256[:12],
                ", ".join(result["changed"]) or "nothing",
            )
        else:
            log.error("config reload (%s) %s: %s", trigger, result["result"], result["error"])
        return result

    async def _reload(self) -> dict[str, Any]:
        path = self.path
        if not path:
            return _failed("invalid", "no config file to reload (run with --config FILE)")
        if self.watch is not None:
            self.watch.seen()
        try:
            data = read_bytes(path)
            new = load_config_bytes(data, path)
        except ConfigError as exc:
            return _failed("invalid", str(exc), key=exc.key)
        sha = digest(data)
        plan = self._plan(new)
        if plan.refused:
            return _failed("refused", "; ".join(plan.refused), sha256=sha)
        details: dict[str, Any] | None = None
        if not plan.unchanged:
            try:
                details = await self._apply(new, plan)
            except ReloadRefused as exc:
                return _failed("refused", str(exc), sha256=sha)
            self.generation += 1
        self.version = ConfigVersion(sha, self._wall_clock(), path)
        result: dict[str, Any] = {"result": "ok", "sha256": sha, "changed": list(plan.changed)}
        if details:
            result.update(details)
        return result

    # -- triggers --------------------------------------------------------------

    def start(self, *, watch: bool, sighup: bool = True) -> None:
        """SIGHUP reloads, and (`watch`, while `reload.watch` is on) so does a change of
        the file. The poll is a timer callback, not a task: a stat every poll_interval."""
        self._loop = loop = asyncio.get_running_loop()
        if sighup:
            loop.add_signal_handler(signal.SIGHUP, self._spawn, "sighup")
        else:  # a worker: its supervisor reloads it; SIGHUP to the group must not kill it
            loop.add_signal_handler(signal.SIGHUP, log.debug, "SIGHUP: the supervisor reloads")
        self._watching = watch and self.watch is not None
        self._arm()

    def _spawn(self, trigger: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self) -> None:
        if not self._watching or self._timer is not None or self._loop is None:
            return
        cfg = self._running().reload
        if cfg.watch:
            self._timer = self._loop.call_later(cfg.poll_interval, self._poll)

    def _poll(self) -> None:
        self._timer = None
        assert self.watch is not None
        if self.watch.changed():
            self._spawn("file")  # re-arms when done
        else:
            self._arm()

    def close(self) -> None:
        self._watching = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()


def _failed(result: str, error: str, **extra: str) -> dict[str, Any]:
    return {"result": result, "error": error, **extra}
