"""proxy-wasm filters: a host for the proxy-wasm ABI on wasmtime (see docs/wasm.md)."""

from __future__ import annotations

from .filter import WasmConfig, WasmFilter, factory

__all__ = ["WasmConfig", "WasmFilter", "factory"]
