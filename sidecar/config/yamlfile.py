"""The config file's YAML, read strictly: duplicate keys and object tags are errors."""

from __future__ import annotations

from typing import Any

import yaml

from sidecar.typedconfig import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_bytes(path: str) -> bytes:
    """The config file's bytes (what a reload hashes, then parses)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e.strerror}", path=path) from None


def parse_yaml(data: bytes, path: str) -> object:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text (byte {e.start})", path=path) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no object tags
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError("", f"{where}invalid YAML: {e.problem or e}", path=path) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", path=path) from None
