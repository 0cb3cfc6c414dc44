"""Loading a config: the file, then the environment, then build and check."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

from sidecar import typedconfig
from sidecar.config.checks import validate
from sidecar.config.env import apply_env
from sidecar.config.rules import SIDECAR_RULES
from sidecar.config.schema import SidecarConfig
from sidecar.config.yamlfile import parse_yaml, read_bytes
from sidecar.typedconfig import ConfigError, show

_T = TypeVar("_T")


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Read the YAML file (if any), apply `OPUS_*` overrides, build and validate.

    `environ` defaults to `os.environ`; pass `{}` to ignore the environment.
    Raises ConfigError naming the key (and the file or variable it came from).
    """
    return load_config_bytes(read_bytes(path) if path else None, path, environ)


def load_config_bytes(
    data: bytes | None, path: str | None, environ: Mapping[str, str] | None = None
) -> SidecarConfig:
    """`load_config` on bytes already read from `path` (a reload hashes what it parses):
    the one validator `run`, `check-config` and every reload share."""
    env = os.environ if environ is None else environ
    raw: object = parse_yaml(data, path or "") if data is not None else None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "", f"must hold a mapping at the top level, got {show(raw)}", path=path or ""
        )
    sources = apply_env(raw, env)
    try:
        cfg = typedconfig.build_dataclass(SidecarConfig, raw, "", SIDECAR_RULES)
        validate(cfg)
    except ConfigError as e:
        var = next((v for k, v in sources.items() if _is_within(e.key, k)), "")
        raise ConfigError(e.key, e.message, path=path or "", env_var=var) from None
    return cfg


def build_dataclass(cls: type[_T], raw: object, key: str) -> _T:
    """Build a dataclass of the sidecar's schema (a section of it) with its rules."""
    return typedconfig.build_dataclass(cls, raw, key, SIDECAR_RULES)


def _is_within(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))
