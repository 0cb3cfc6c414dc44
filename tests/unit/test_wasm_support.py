"""Shared by the wasm unit tests (no tests here): build a wasm filter in process and run
calls through it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from filters.wasm.filter import WasmConfig, WasmFilter, _build
from filters.wasm.runtime import WasmRuntime
from sidecar.chain import FilterContext, compose
from sidecar.messages import Headers, Response
from sidecar.metrics import Metrics
from tests.unit.chain_helpers import Terminal, make_call

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "wasm_fixtures"
EXAMPLES = REPO / "wasm_examples"


def build(
    path: Path, runtime: WasmRuntime, metrics: Metrics | None = None, **config: Any
) -> WasmFilter:
    cfg = WasmConfig(path=str(path), **config)
    filter_metrics = metrics.filters if metrics is not None else None
    ctx = FilterContext("outbound", "payment", filter_metrics, extra={"wasm_runtime": runtime})
    flt = _build(cfg, ctx)
    flt.name = "wasm"
    assert isinstance(flt, WasmFilter)
    return flt


def call_through(
    flt: WasmFilter,
    headers: Headers | None = None,
    metrics: Metrics | None = None,
    body: bytes = b"",
) -> tuple[Response, Terminal]:
    terminal = Terminal()
    chain = compose([flt], terminal, metrics)

    async def go() -> Response:
        return await chain(make_call(body=body, headers=headers))

    return asyncio.run(go()), terminal


def calls_through(
    flt: WasmFilter, requests: list[Headers], metrics: Metrics | None = None
) -> tuple[list[Response], Terminal]:
    """Several calls on one event loop (as in a sidecar: tick timers live on the loop)."""
    terminal = Terminal()
    chain = compose([flt], terminal, metrics)

    async def go() -> list[Response]:
        return [await chain(make_call(headers=h)) for h in requests]

    return asyncio.run(go()), terminal
