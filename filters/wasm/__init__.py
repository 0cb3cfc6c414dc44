"""proxy-wasm filters: a host for the proxy-wasm ABI on wasmtime (see docs/wasm.md).

The package face is lazy (PEP 562): `filters.wasm.WasmFilter` and the registry's
"filters.wasm:factory" import filter.py, and with it wasmtime, on first use, so the
pure modules (`filters.wasm.abi`, `filters.wasm.context`) load without wasmtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .filter import WasmConfig, WasmFilter, factory

__all__ = ["WasmConfig", "WasmFilter", "factory"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".filter", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
