"""HMAC keys for hmac_sign and hmac_verify: where they live, loading, and reloading.

A filter's config names only where keys live (a file, a Kubernetes Secret directory or
an environment variable), never a secret, so config dumps and reprs cannot leak one.
Several keys may be live at once (rotation); each has an id (a bare single secret has
the id given by `key_id`, possibly none). Files and directories are re-read when they
change, checked at most every `reload_interval` seconds on the call path: a stat or a
short directory listing, and a read of a few small files only when something changed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import yaml

log = logging.getLogger("sidecar.filters.hmac")

Clock = Callable[[], float]


class KeyLoadError(ValueError):
    """The keys could not be loaded; the message names the source, never a secret."""


@dataclass(frozen=True, slots=True)
class KeySourceConfig:
    """Where keys live: exactly one of key_file, key_dir and key_env."""

    # YAML/JSON mapping {key_id: secret | {secret, services}}, or one bare secret.
    key_file: str = ""
    # A mounted Kubernetes Secret: one file per key id (kubelet's ..data layout is fine).
    key_dir: str = ""
    # An environment variable holding one bare secret, or a JSON object {key_id: secret}.
    key_env: str = ""
    # The id of a bare secret; on hmac_sign, also which of several keys signs.
    key_id: str = ""
    # How often (seconds, at most) a key file or directory is checked for changes.
    reload_interval: float = 1.0

    def validate_source(self) -> None:
        chosen = [name for name in ("key_file", "key_dir", "key_env") if getattr(self, name)]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise ValueError(f"set exactly one of key_file, key_dir and key_env (got {got})")
        if not self.reload_interval > 0:
            raise ValueError(f"reload_interval must be > 0, got {self.reload_interval}")

    def describe(self) -> str:
        if self.key_file:
            return f"key_file {self.key_file!r}"
        if self.key_dir:
            return f"key_dir {self.key_dir!r}"
        return f"key_env {self.key_env!r}"


@dataclass(frozen=True, slots=True)
class Key:
    key_id: str  # "" for an anonymous bare secret
    secret: bytes = field(repr=False)
    # The services the key is valid for (a key file's {secret, services} form); None: any.
    services: frozenset[str] | None = None

    def valid_for(self, service: str) -> bool:
        return self.services is None or service in self.services


Keys = Mapping[str, Key]
# A secret as read, with the services it is scoped to when the source says.
_Secret = bytes | tuple[bytes, frozenset[str]]
Fingerprint = tuple[object, ...] | None


def load_keys(source: KeySourceConfig, environ: Mapping[str, str] | None = None) -> Keys:
    """Read every key the source holds now; KeyLoadError says what is wrong (no secrets)."""
    where = source.describe()
    if source.key_file:
        raw = _read_text(source.key_file, where)
        secrets = _parse_file(raw, where)
    elif source.key_dir:
        secrets = _read_dir(source.key_dir, where)
    else:
        env = os.environ if environ is None else environ
        value = env.get(source.key_env)
        if value is None:
            raise KeyLoadError(f"{where}: the environment variable is not set")
        secrets = _parse_env(value, where)
    if secrets is None:
        raise KeyLoadError(f"{where}: holds no key")
    if isinstance(secrets, bytes):
        secrets = {source.key_id: secrets}
    elif source.key_id and source.key_id not in secrets:
        raise KeyLoadError(f"{where}: has no key with id {source.key_id!r}")
    keys: dict[str, Key] = {}
    for key_id, secret in secrets.items():
        services = None
        if isinstance(secret, tuple):
            secret, services = secret
        if not secret:
            raise KeyLoadError(f"{where}: key {key_id!r} is empty")
        keys[key_id] = Key(key_id, secret, services)
    return MappingProxyType(keys)


def _read_text(path: str, where: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise KeyLoadError(f"{where}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyLoadError(f"{where}: is not UTF-8 text") from None


def _parse_file(text: str, where: str) -> dict[str, _Secret] | bytes | None:
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None  # not YAML at all: a bare secret
    if isinstance(parsed, Mapping):
        return _secret_mapping(parsed, where)
    # Anything else is one bare secret: the text itself, not YAML's reading of it
    # (which would turn "0123" into a number).
    bare = text.strip().encode()
    return bare or None


def _parse_env(value: str, where: str) -> dict[str, _Secret] | bytes | None:
    text = value.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise KeyLoadError(f"{where}: starts with '{{' but is not a JSON object") from None
        if isinstance(parsed, Mapping):
            return _secret_mapping(parsed, where)
    return text.encode() or None


def _secret_mapping(parsed: Mapping[object, object], where: str) -> dict[str, _Secret] | None:
    out: dict[str, _Secret] = {}
    for key_id, secret in parsed.items():
        if not isinstance(key_id, str) or not key_id:
            raise KeyLoadError(f"{where}: key ids must be non-empty strings, got {key_id!r}")
        if isinstance(secret, Mapping):
            out[key_id] = _scoped_secret(key_id, secret, where)
            continue
        if not isinstance(secret, str):
            # The value itself is never echoed: it may be a secret YAML read as a number.
            raise KeyLoadError(f"{where}: key {key_id!r} must be a string (quote it)")
        out[key_id] = secret.strip().encode()
    return out or None


def _scoped_secret(
    key_id: str, entry: Mapping[object, object], where: str
) -> tuple[bytes, frozenset[str]]:
    """{secret: ..., services: [...]}: a key valid only for the services named."""
    extra = sorted(str(k) for k in entry if k not in ("secret", "services"))
    if extra:
        raise KeyLoadError(f"{where}: key {key_id!r} has unknown fields {extra}")
    secret = entry.get("secret")
    if not isinstance(secret, str):
        raise KeyLoadError(f"{where}: key {key_id!r} needs a string 'secret' (quote it)")
    services = entry.get("services")
    if (
        not isinstance(services, list)
        or not services
        or not all(isinstance(s, str) and s for s in services)
    ):
        raise KeyLoadError(
            f"{where}: key {key_id!r}: 'services' must be a non-empty list of service names"
        )
    return secret.strip().encode(), frozenset(services)


def _read_dir(path: str, where: str) -> dict[str, _Secret] | None:
    out: dict[str, _Secret] = {}
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise KeyLoadError(f"{where}: cannot list: {exc.strerror}") from None
    for entry in entries:
        # kubelet keeps its bookkeeping in dot-names (..data, ..2024_01_01_...).
        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=True):
            continue
        try:
            with open(entry.path, "rb") as f:
                out[entry.name] = f.read().strip()
        except OSError as exc:
            raise KeyLoadError(f"{where}: cannot read key {entry.name!r}: {exc.strerror}") from None
    return out or None


def fingerprint(source: KeySourceConfig) -> Fingerprint:
    """What changes when the keys do; None when the source cannot be seen at all."""
    try:
        if source.key_file:
            st = os.stat(source.key_file)
            return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        if source.key_dir:
            parts: list[object] = []
            with os.scandir(source.key_dir) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    st = entry.stat(follow_symlinks=True)
                    parts.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
            data_link = os.path.join(source.key_dir, "..data")
            target = os.readlink(data_link) if os.path.islink(data_link) else ""
            return (target, *sorted(parts, key=str))
    except OSError:
        return None
    return ()  # the environment does not change under a running process


class KeyRing:
    """The live keys of one filter, re-read when their file or directory changes.

    A reload that fails, or whose keys `check` refuses (say, without the key this
    sidecar signs with), keeps the last good keys: a half-written file must not take
    the mesh down.
    """

    def __init__(
        self,
        source: KeySourceConfig,
        now: Clock,
        environ: Mapping[str, str] | None = None,
        check: Callable[[Keys], object] | None = None,
    ) -> None:
        self.source = source
        self._now = now
        self._environ = environ
        self._check = check  # raises ValueError for keys the filter cannot work with
        self._seen = fingerprint(source)
        self._keys = self._load()
        self._checked_at = now()
        self._reloadable = bool(source.key_file or source.key_dir)

    def __repr__(self) -> str:
        return f"KeyRing({self.source.describe()}, key_ids={sorted(self._keys)})"

    def keys(self) -> Keys:
        if self._reloadable:
            now = self._now()
            # A clock stepped backwards must not postpone the check forever.
            if now - self._checked_at >= self.source.reload_interval or now < self._checked_at:
                self._checked_at = now
                self._maybe_reload()
        return self._keys

    def _maybe_reload(self) -> None:
        seen = fingerprint(self.source)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            keys = self._load()
        except ValueError as exc:  # KeyLoadError included
            log.warning("keeping the previous HMAC keys from %s: %s", self.source.describe(), exc)
            return
        self._keys = keys
        log.info("reloaded HMAC keys from %s: ids %s", self.source.describe(), sorted(keys))

    def _load(self) -> Keys:
        keys = load_keys(self.source, self._environ)
        if self._check is not None:
            self._check(keys)
        return keys
