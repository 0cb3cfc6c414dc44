"""`OPUS_*` environment overrides: one variable per leaf key of the schema."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

import yaml

from sidecar.config.schema import SidecarConfig
from sidecar.typedconfig import type_hints

ENV_PREFIX = "OPUS_"
# Read by the client library, not the sidecar: never reported as unknown.
_ENV_NOT_OURS = frozenset({"OPUS_SIDECAR_URL"})


@functools.cache
def _env_leaves() -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every overridable leaf: env var name -> (schema path, type).

    Built by walking the schema, so a field name's own underscores never need
    splitting: `OPUS_UPSTREAM_MAX_PER_ROUTE` is looked up, not parsed.
    """
    leaves: dict[str, tuple[tuple[str, ...], Any]] = {}

    def walk(cls: type, path: tuple[str, ...]) -> None:
        for name, tp in type_hints(cls).items():
            sub = (*path, name)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, sub)
            elif get_origin(tp) is dict:
                continue  # keyed collections have no fixed env names
            elif get_origin(tp) is tuple and dataclasses.is_dataclass(get_args(tp)[0]):
                continue
            else:
                var = ENV_PREFIX + "_".join(sub).upper()
                if var in leaves:  # would make one variable mean two keys
                    raise TypeError(f"config keys {leaves[var][0]} and {sub} share {var}")
                leaves[var] = (sub, tp)

    walk(SidecarConfig, ())
    return leaves


def env_override_names() -> dict[str, str]:
    """Every supported `OPUS_*` variable, mapped to the dotted key it sets."""
    return {var: ".".join(path) for var, (path, _) in _env_leaves().items()}


def unknown_env_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    """`OPUS_*` variables that set nothing (probably misspelt), for the CLI to warn about."""
    env = os.environ if environ is None else environ
    leaves = _env_leaves()
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX) and name not in leaves and name not in _ENV_NOT_OURS
    )


def _env_value(tp: Any, text: str) -> object:
    if tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp))):
        return text  # taken verbatim, so OPUS_SERVICE_NAME=123 stays a string
    if get_origin(tp) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not a scalar at all; the type check reports it
    return value


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Set the env values into the raw tree; returns dotted key -> variable for errors."""
    sources: dict[str, str] = {}
    for var, (path, tp) in _env_leaves().items():
        if var not in environ:
            continue
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                break  # the file's own value is malformed; building reports it
            node = child
        else:
            node[path[-1]] = _env_value(tp, environ[var])
            sources[".".join(path)] = var
    return sources
