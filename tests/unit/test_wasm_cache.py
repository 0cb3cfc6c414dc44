"""The compiled-module cache: keyed by content, wasmtime version and engine settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from filters.wasm.cache import ModuleCache, default_cache_dir, wasm_bytes
from tests.unit.test_wasm_support import FIXTURES


def _engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return wasmtime.Engine(config)


def test_second_process_loads_from_disk_without_compiling(tmp_path: Path) -> None:
    wasm = wasm_bytes(FIXTURES / "trap.wat")
    engine = _engine()
    first = ModuleCache(engine, "epoch", tmp_path)
    first.load(wasm)
    assert (first.compiles, first.hits) == (1, 0)
    assert len(list(tmp_path.glob("*.cwasm"))) == 1

    again = ModuleCache(engine, "epoch", tmp_path)  # as a restarted sidecar would
    module = again.load(wasm)
    assert (again.compiles, again.hits) == (0, 1)
    assert "proxy_on_request_headers" in {e.name for e in module.exports}


def test_key_covers_content_and_settings(tmp_path: Path) -> None:
    engine = _engine()
    a = wasm_bytes(FIXTURES / "trap.wat")
    b = wasm_bytes(FIXTURES / "loop.wat")
    cache = ModuleCache(engine, "epoch", tmp_path)
    assert cache.key(a) != cache.key(b)
    assert cache.key(a) != ModuleCache(engine, "fuel", tmp_path).key(a)
    assert "wasmtime-" in cache.tag


def test_a_corrupt_entry_is_recompiled(tmp_path: Path) -> None:
    engine = _engine()
    wasm = wasm_bytes(FIXTURES / "trap.wat")
    cache = ModuleCache(engine, "epoch", tmp_path)
    (tmp_path / f"{cache.key(wasm)}.cwasm").write_bytes(b"garbage")
    cache.load(wasm)
    assert cache.compiles == 1
    assert ModuleCache(engine, "epoch", tmp_path).load(wasm) is not None


def test_default_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "opus-mesh" / "wasm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "opus-mesh" / "wasm"
