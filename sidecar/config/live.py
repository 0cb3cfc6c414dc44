"""What a reloaded config changes, and what it may not change while the sidecar runs.

`plan_reload(running, new, ...)` compares two built (and so already validated) configs
key by key: it names every key that changed, the listeners to rebind, the outbound
clusters to replace (their `ClusterSettings` differ; the others, and their pooled
connections, are kept), and refuses the reload when a key that only a restart can apply
changed, naming each such key. Pure: no I/O, so the plan is unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sidecar.config.derived import cluster_settings, config_to_dict
from sidecar.config.schema import SidecarConfig

# Keys (and everything under them) a running sidecar cannot take, and why.
RESTART_ONLY: tuple[tuple[str, str], ...] = (
    ("workers", "the worker processes are started once"),
    ("service", "the instance is registered and named by it"),
    ("app", "the app's cluster and discovery's app probe are built from it at start"),
    ("discovery", "the discovery backend is started once"),
    ("listeners.admin", "the admin listener is the one taking this reload"),
    ("listeners.capture", "the capture listener is bound once"),
    ("listeners.advertise_host", "the instance is registered with it"),
    ("capture", "the capture listener is built once"),
    ("log.access_log", "the access log is opened once"),
    ("limits.fd_reserve", "the fd budget is computed once, at start"),
    ("tls", "the mode, trust domain and source are set at start (certificates rotate live)"),
    ("authorization.intentions", "the Consul agent's client is made once, at start"),
)
# With mTLS on, the inbound listener accepts on a socket of its own (listener.py).
RESTART_ONLY_WITH_TLS: tuple[tuple[str, str], ...] = (
    ("listeners.inbound", "an mTLS listener is bound once (tls.mode is not disable)"),
)
# Under `workers: N` the supervisor holds the data ports for every worker.
RESTART_ONLY_WITH_WORKERS: tuple[tuple[str, str], ...] = (
    ("listeners.outbound", "the supervisor reserved the data ports at start (workers > 1)"),
    ("listeners.inbound", "the supervisor reserved the data ports at start (workers > 1)"),
)
REBINDABLE = ("outbound", "inbound")
# Refusals list at most this many keys (a wholly different file would list them all).
MAX_NAMED = 10


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    changed: tuple[str, ...]  # every key whose value changed, dotted (`routes[1].service`)
    refused: tuple[str, ...]  # why it cannot be applied live, each naming its key
    rebind: tuple[str, ...]  # listeners whose address changed
    clusters: tuple[str, ...]  # outbound clusters to replace (their settings changed)

    @property
    def unchanged(self) -> bool:
        return not self.changed


def plan_reload(
    running: SidecarConfig,
    new: SidecarConfig,
    clusters: Iterable[str] = (),
    *,
    workers: bool = False,
) -> ReloadPlan:
    """The plan for going from `running` to `new`; `clusters` are the services whose
    outbound clusters exist now; `workers`: this process is one of several workers (or
    their supervisor)."""
    changed = tuple(changed_keys(config_to_dict(running), config_to_dict(new)))
    locked = RESTART_ONLY + (RESTART_ONLY_WITH_WORKERS if workers else ())
    if running.tls.mode != "disable":
        locked += RESTART_ONLY_WITH_TLS
    refused = []
    for key in changed:
        why = next((why for prefix, why in locked if _within(key, prefix)), None)
        if why is not None:
            refused.append(f"{key} cannot change without a restart: {why}")
    if len(refused) > MAX_NAMED:
        refused[MAX_NAMED:] = [f"and {len(refused) - MAX_NAMED} more"]
    rebind = tuple(
        name
        for name in REBINDABLE
        if getattr(running.listeners, name) != getattr(new.listeners, name)
    )
    replaced = tuple(
        sorted(
            service
            for service in clusters
            if cluster_settings(running, service) != cluster_settings(new, service)
        )
    )
    return ReloadPlan(changed, tuple(refused), rebind, replaced)


def changed_keys(old: Any, new: Any, key: str = "") -> list[str]:
    """The dotted keys at which two plain configs (`config_to_dict`) differ: mappings key
    by key, lists of the same length item by item, anything else as a whole."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for name in sorted(old.keys() | new.keys(), key=str):
            sub = f"{key}.{name}" if key else str(name)
            out += changed_keys(old.get(name), new.get(name), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += changed_keys(a, b, f"{key}[{i}]")
        return out
    return [key]


def _within(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))
