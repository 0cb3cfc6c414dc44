"""Building frozen config dataclasses from plain data (parsed YAML), strictly.

Owns the generic builder: unknown keys, wrong types and out-of-range values are
`ConfigError`s naming the dotted key. It knows no schema; the sidecar's own config
(`sidecar.config`) and each filter's config dataclass are built with it. Imports
nothing from the rest of the sidecar, so anything may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import keyword
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

_T = TypeVar("_T")


class ConfigError(Exception):
    """A bad config value, named by its dotted key (`routes[1].service`).

    `path` is the config file the value came from and `env_var` the environment
    variable that set it, when known, so the message points at what to edit.
    """

    def __init__(self, key: str, message: str, *, path: str = "", env_var: str = "") -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message
        self.path = path
        self.env_var = env_var

    def __str__(self) -> str:
        text = self.message
        if self.key:
            origin = f" (from {self.env_var})" if self.env_var else ""
            text = f"config key '{self.key}'{origin}: {text}"
        if self.path and not self.env_var:
            text = f"{self.path}: {text}"
        return text


@dataclass(frozen=True, slots=True)
class Bound:
    """The range a number must fall in."""

    low: float
    high: float | None = None
    low_open: bool = False  # "> low" rather than ">= low"

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is not None:
            return f" in {show_number(self.low)}..{show_number(self.high)}"
        return f" {'>' if self.low_open else '>='} {show_number(self.low)}"


@dataclass(frozen=True, slots=True)
class Rules:
    """Value rules a schema's types cannot express.

    Keyed by (dataclass, field) rather than dotted path, so that every instance of a
    type (each listener, each per-service override) gets the same rule.
    """

    bounds: Mapping[tuple[type, str], Bound] = field(default_factory=dict)
    # Applied to a raw string before its type check (`level: debug` -> "DEBUG").
    normalize: Mapping[tuple[type, str], Callable[[str], str]] = field(default_factory=dict)
    # Dataclasses that may also be written as one string: type -> parse(text, key).
    from_text: Mapping[type, Callable[[str, str], object]] = field(default_factory=dict)


NO_RULES = Rules()


def build_dataclass(cls: type[_T], raw: object, key: str, rules: Rules = NO_RULES) -> _T:
    """Build `cls` from a mapping, checking every value; errors name keys under `key`."""
    return _build(cls, raw, key, rules)


@functools.cache
def type_hints(cls: Any) -> dict[str, Any]:
    """A dataclass's resolved field types (cached: schemas do not change)."""
    return get_type_hints(cls)


def show(value: object) -> str:
    # The input is YAML, so echo YAML's spellings for the values Python spells differently.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def show_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type[_T], raw: object, key: str, rules: Rules, base: object = None) -> _T:
    """Build `cls` from a mapping; keys it leaves out come from `base`, else the defaults.

    `base` is the parent field's default instance, so `listeners: {inbound: {port: 0}}`
    keeps the inbound default host rather than demanding one.
    """
    if raw is None:  # an empty section (`log:` with nothing under it) means defaults
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mapping, got {show(raw)}")
    schema: Any = cls  # for the dataclass helpers, which type[_T] does not satisfy
    hints = type_hints(schema)
    known = [config_name(n) for n in hints]
    for name in raw:
        if name not in known:
            raise ConfigError(join(key, str(name)), _unknown_key_message(str(name), known))
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(schema):
        default = _default(f, base)
        spelt = config_name(f.name)
        if spelt in raw:
            value = raw[spelt]
            normalize = rules.normalize.get((cls, f.name))
            if normalize is not None and isinstance(value, str):
                value = normalize(value)
            bound = rules.bounds.get((cls, f.name))
            kwargs[f.name] = _convert(hints[f.name], value, join(key, spelt), rules, bound, default)
        elif default is dataclasses.MISSING:
            raise ConfigError(join(key, spelt), "is required")
        else:
            kwargs[f.name] = default
    return cls(**kwargs)


def config_name(field_name: str) -> str:
    """How a field is spelt in the config: a Python keyword's field (`from_`) without
    its trailing underscore (`from`)."""
    if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]):
        return field_name[:-1]
    return field_name


def _default(f: dataclasses.Field[Any], base: object) -> object:
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unknown_key_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key; known keys: {', '.join(known)}"


def _convert(
    tp: Any,
    value: object,
    key: str,
    rules: Rules,
    bound: Bound | None = None,
    default: object = None,
) -> object:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _convert(inner, value, key, rules, bound)
    if origin is Literal:
        # `in` alone would let `true` through for a `1` choice (True == 1).
        if any(type(value) is type(a) and value == a for a in args):
            return value
        choices = ", ".join(show(a) for a in args)
        raise ConfigError(key, f"must be one of {choices}, got {show(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {show(value)}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", rules) for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {show(value)}")
        out: dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key, f"keys must be strings, got {show(k)}")
            out[k] = _convert(args[1], v, join(key, k), rules)
        return out
    if tp is Any:  # a filter's own config: the filter's factory validates it
        return value
    parse = rules.from_text.get(tp)
    if parse is not None and isinstance(value, str):
        return parse(value, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key, rules, default if isinstance(default, tp) else None)
    if tp is bool:
        # YAML already turned true/false into bools; a 1 or "yes" string is a mistake.
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be a boolean (true or false), got {show(value)}")
        return value
    if tp is int or tp is float:
        return check_number(tp, value, key, bound)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {show(value)}")
        return value
    raise TypeError(f"config schema type {tp!r} at {key!r} is not supported")


def check_number(tp: type, value: object, key: str, bound: Bound | None) -> int | float:
    """`value` as an int or float (per `tp`) within `bound`, else a ConfigError."""
    what = "an integer" if tp is int else "a number"
    expected = what + (bound.describe() if bound else "")
    accepted = (int,) if tp is int else (int, float)
    # bool is a subclass of int, but `port: true` is never what anyone meant.
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigError(key, f"must be {expected}, got {show(value)}")
    number: int | float = value if tp is int else float(value)
    if not math.isfinite(number) or (bound is not None and not bound.holds(number)):
        raise ConfigError(key, f"must be {expected}, got {show(value)}")
    return number
