"""What a sidecar process and the supervisor of its workers (`workers: N`) share.

Either one is the process the admin server controls and the one `--ports-file` names:
`ControlledProcess` holds the admin-state methods both answer alike, `write_ports` and
`read_port` the ports file's format.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from sidecar.config import SidecarConfig, config_to_dict
from sidecar.reload import LiveConfig

_SECRET_WORDS = ("secret", "password", "token", "credential", "private")


class ControlledProcess:
    """The part of `admin.AdminState` a sidecar and a supervisor answer alike."""

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.ready = False
        self.draining = False
        self._stop = asyncio.Event()
        self.live: LiveConfig | None = None  # set once running (sidecar/reload.py)

    def quit(self) -> None:
        """Drain and exit (SIGTERM, or POST /quitquitquit for Jobs whose app has exited)."""
        self._stop.set()

    def config_dump(self) -> dict[str, Any]:
        dumped: dict[str, Any] = redact(config_to_dict(self.cfg))
        if self.live is not None:
            dumped.update(self.live.dump())  # the running version's hash and load time
        return dumped

    async def reload_config(self, trigger: str) -> dict[str, Any]:
        if self.live is None:
            return {"result": "refused", "error": "not running yet", "trigger": trigger}
        return await self.live.reload(trigger)


def redact(value: Any, key: str = "") -> Any:
    """The config with anything that looks like a secret replaced, for /config_dump.
    (Keys themselves live in files the config only names: key_file, key_dir, key_env.)"""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and value and any(w in key.lower() for w in _SECRET_WORDS):
        return "[redacted]"
    return value


def write_ports(path: str, ports: dict[str, int]) -> None:
    """The bound ports as JSON, written whole (renamed into place) for readers polling it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(ports, fh)
    os.replace(tmp, path)


def read_port(path: str, name: str) -> int:
    """One port from a ports file, once its process has written it (0 before)."""
    try:
        with open(path, encoding="utf-8") as fh:
            port: int = json.load(fh)[name]
    except (FileNotFoundError, ValueError, KeyError):
        return 0
    return port
