"""Fused callbacks (filters/wasm/fused.py): the driver runs callbacks the host would run
back to back in one call into wasm; the guest must see no difference. Each case runs
through the native boundary (with the driver) and the public API (without), in process."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from filters.wasm.filter import WasmConfig, WasmFilter, load_plugin
from filters.wasm.fused import plan
from filters.wasm.runtime import WasmRuntime
from filters.wasm.servicecalls import ServiceCalls
from sidecar.chain import FilterContext
from tests.unit.test_wasm_support import EXAMPLES, FIXTURES, call_through, calls_through


@pytest.fixture
def runtime() -> Iterator[WasmRuntime]:
    rt = WasmRuntime(cache_dir=None, tick_ms=60_000)  # the tests tick by hand
    yield rt
    rt.close()


def _probe(runtime: WasmRuntime, native: bool) -> WasmFilter:
    config = WasmConfig(path=str(FIXTURES / "fused_probe.wat"))
    ctx = FilterContext("outbound", "payment", extra={"wasm_runtime": runtime})
    flt = WasmFilter(load_plugin(config, ctx, "wasm", native=native), False, False)
    flt.name = "wasm"
    return flt


def _ends(flt: WasmFilter) -> dict[str, int]:
    return {m.name: m.value for m in flt.plugin.metrics.by_id.values()}


@pytest.mark.parametrize("native", [True, False])
def test_the_guest_sees_each_callback_apart(runtime: WasmRuntime, native: bool) -> None:
    flt = _probe(runtime, native)
    assert (flt.plugin.acquire().fused is not None) is native  # the driver is linked or not
    response, terminal = call_through(flt)
    # on_context_create found no request yet (NOT_FOUND), and the effective context it
    # set did not outlive it: on_request_headers added to its own stream.
    assert (b"x-create-saw", b"1") in terminal.headers[0]
    assert response.status == 200
    assert (b"x-resp", b"yes") in response.headers
    assert _ends(flt) == {"done": 1, "log": 1, "delete": 1}


@pytest.mark.parametrize("native", [True, False])
def test_a_local_reply_from_the_response_headers_still_ends_the_stream(
    runtime: WasmRuntime, native: bool
) -> None:
    flt = _probe(runtime, native)
    responses, _ = calls_through(flt, [[(b"x-local", b"1")], []])
    assert [r.status for r in responses] == [418, 200]
    assert responses[0].body.buffered_whole == b"local"
    assert _ends(flt) == {"done": 2, "log": 2, "delete": 2}


@pytest.mark.parametrize("native", [True, False])
def test_a_trap_at_the_streams_end_keeps_the_response(
    runtime: WasmRuntime, native: bool, caplog: pytest.LogCaptureFixture
) -> None:
    flt = _probe(runtime, native)
    with caplog.at_level(logging.WARNING, logger="sidecar.wasm"):
        responses, _ = calls_through(flt, [[(b"x-trap-done", b"1")], []])
    # As when on_done ran after the response phase: the response stands, the instance goes.
    assert [r.status for r in responses] == [200, 200]
    assert all((b"x-resp", b"yes") in r.headers for r in responses)
    assert flt.plugin.metrics.traps == 1
    assert flt.plugin.metrics.instances == 2
    assert _ends(flt) == {"done": 2, "log": 1, "delete": 1}  # the trapped one stopped there
    trapped = [r.getMessage() for r in caplog.records if "trapped" in r.getMessage()]
    assert len(trapped) == 1 and "proxy_on_done: " in trapped[0]


def test_each_fused_callback_gets_its_own_deadline(
    runtime: WasmRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick during one callback of a fused call gives the next a fresh deadline, as
    the host does before each callback it runs itself."""
    increment = ServiceCalls.proxy_increment_metric

    def tick_then_increment(self: ServiceCalls, metric_id: int, delta: int) -> int:
        if self.host.metrics.by_id[metric_id].name == "done":
            runtime.tick()  # the epoch moves while on_done runs
        return increment(self, metric_id, delta)

    monkeypatch.setattr(ServiceCalls, "proxy_increment_metric", tick_then_increment)
    flt = _probe(runtime, True)
    vm = flt.plugin.acquire()
    set_deadline = vm._set_deadline
    deadlines: list[int] = []

    def recording(ticks: int) -> None:
        deadlines.append(runtime.epoch)
        set_deadline(ticks)

    vm._set_deadline = recording
    epoch = runtime.epoch
    response, _ = call_through(flt)
    assert response.status == 200
    assert _ends(flt) == {"done": 1, "log": 1, "delete": 1}
    # on_response_headers, on_done, on_log and on_delete ran in one call; the deadline
    # was set again when on_log started, the epoch having moved during on_done.
    assert runtime.epoch == epoch + 1
    assert deadlines == [epoch + 1]


def test_plans() -> None:
    import wasmtime

    engine = wasmtime.Engine()

    def exports(path: str) -> dict[str, wasmtime.FuncType]:
        module = wasmtime.Module.from_file(engine, path)
        return {e.name: e.type for e in module.exports if isinstance(e.type, wasmtime.FuncType)}

    sdk_like = plan("0.2.1", exports(str(FIXTURES / "fused_probe.wat")))
    assert sdk_like is not None
    assert sdk_like.begin == ("proxy_on_context_create", "proxy_on_request_headers")
    assert sdk_like.finish[0] == "proxy_on_response_headers"
    assert sdk_like.close == ("proxy_on_done", "proxy_on_log", "proxy_on_delete")
    wat = plan("0.2.1", exports(str(EXAMPLES / "wat" / "add_header.wat")))
    assert wat is not None and wat.close == ()  # on_done alone: nothing to fuse
    assert plan("0.1.0", exports(str(FIXTURES / "abi_010.wat"))) is None  # one callback


def test_the_ticker_lets_go_of_instances_that_are_gone(runtime: WasmRuntime) -> None:
    flt = _probe(runtime, True)
    calls_through(flt, [[(b"x-trap-done", b"1")], []])  # one instance trapped, one serves
    assert len(runtime._epoch_cells) == 1
    flt.close()
    assert runtime._epoch_cells == {}
    runtime.tick()  # nothing left to write to
