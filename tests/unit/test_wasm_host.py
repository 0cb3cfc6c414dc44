"""The wasm host driven in process with hand-written WAT filters (compiled at test time)
and the chain's own Call/Response objects: no sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from filters.wasm.filter import WasmConfig
from filters.wasm.runtime import WasmRuntime
from sidecar.chain import FilterContext
from sidecar.config import ConfigError
from sidecar.messages import Response
from sidecar.metrics import Metrics
from tests.unit.test_wasm_support import EXAMPLES, FIXTURES, build, call_through, calls_through


@pytest.fixture
def runtime() -> Iterator[WasmRuntime]:
    rt = WasmRuntime(cache_dir=None)
    yield rt
    rt.close()


def test_wat_example_adds_a_response_header(runtime: WasmRuntime) -> None:
    flt = build(EXAMPLES / "wat" / "add_header.wat", runtime)
    response, terminal = call_through(flt)
    assert response.status == 200
    assert (b"x-wat-filter", b"hello-from-wat") in response.headers
    assert terminal.calls == 1


def test_wat_example_answers_403_locally(runtime: WasmRuntime) -> None:
    flt = build(EXAMPLES / "wat" / "add_header.wat", runtime)
    response, terminal = call_through(flt, [(b"x-deny", b"true")])
    assert response.status == 403
    assert response.body.buffered_whole == b"forbidden by wat\n"
    assert terminal.calls == 0  # the upstream never saw it


def test_header_maps_and_properties(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "headers_ops.wat", runtime, root_id="ops-root")
    request = [(b"x-a", b"old"), (b"x-a", b"dup"), (b"x-b", b"gone"), (b"keep", b"me")]
    response, terminal = call_through(flt, request)
    sent = terminal.headers[0]
    assert (b"x-a", b"1") in sent and (b"x-a", b"old") not in sent and (b"x-a", b"dup") not in sent
    assert all(name != b"x-b" for name, _ in sent)
    assert (b"x-c", b"3") in sent and (b"keep", b"me") in sent
    headers = dict(response.headers)
    assert headers[b"x-terminal"] == b"yes"  # survived the get-pairs/set-pairs round trip
    assert headers[b"x-path"] == b"/echo"
    assert headers[b"x-root"] == b"ops-root"
    assert b"x-source" not in headers  # make_call has no peer: NOT_FOUND, nothing added


def test_pause_then_resume_from_a_tick(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "pause_tick.wat", runtime)
    responses, terminal = calls_through(flt, [[], []])
    assert [r.status for r in responses] == [200, 200]
    assert all((b"x-resumed-by", b"tick") in h for h in terminal.headers)


def test_metrics_show_on_the_registry(runtime: WasmRuntime) -> None:
    metrics = Metrics()
    flt = build(EXAMPLES / "wat" / "count_calls.wat", runtime, metrics)
    calls_through(flt, [[], [], []], metrics)
    text = generate_latest(metrics.registry).decode()
    assert 'wat_calls_total{filter="count_calls"} 3.0' in text  # named after the file
    assert 'opus_wasm_instances_total{filter="count_calls"} 1.0' in text


def test_abi_0_1_0_module_runs(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "abi_010.wat", runtime, configuration={"k": "v"})
    response, _ = call_through(flt)
    headers = dict(response.headers)
    assert headers[b"x-abi"] == b"0.1.0"
    assert headers[b"x-config"] == b'{"k":"v"}'  # a mapping configuration travels as JSON


def test_unknown_imports_link_and_answer_unimplemented_once(
    runtime: WasmRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    flt = build(FIXTURES / "unknown_import.wat", runtime)
    with caplog.at_level(logging.WARNING, logger="sidecar.wasm"):
        responses, _ = calls_through(flt, [[], []])
    assert all((b"x-unimplemented", b"yes") in r.headers for r in responses)
    assert flt.plugin.unimplemented == {"env.proxy_made_up"}
    reports = [r for r in caplog.records if "does not implement" in r.getMessage()]
    assert len(reports) == 1


def test_infinite_loop_is_stopped_and_a_fresh_instance_serves_next(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "loop.wat", runtime, max_cpu_ms=30)
    responses, terminal = calls_through(flt, [[(b"x-loop", b"1")], []])
    assert [r.status for r in responses] == [500, 200]
    assert terminal.calls == 1
    assert flt.plugin.metrics.traps == 1
    assert flt.plugin.metrics.instances == 2


def test_trap_fails_closed(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "trap.wat", runtime)
    responses, terminal = calls_through(flt, [[(b"x-trap", b"1")], []])
    assert [r.status for r in responses] == [500, 200]
    assert (b"x-trap-filter", b"ok") in responses[1].headers
    assert terminal.calls == 1


def test_trap_fails_open_when_configured(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "trap.wat", runtime, fail_open=True)
    response, terminal = call_through(flt, [(b"x-trap", b"1")])
    assert response.status == 200
    assert terminal.calls == 1
    assert (b"x-trap", b"1") in terminal.headers[0]  # passed untouched
    assert (b"x-trap-filter", b"ok") not in response.headers


def test_memory_is_capped(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "grow.wat", runtime, max_memory_mb=4)
    responses, _ = calls_through(flt, [[(b"x-grow", b"1")], []])
    assert [r.status for r in responses] == [500, 200]
    assert flt.plugin.metrics.traps == 1


def _config_error(path: Path) -> str:
    from sidecar.chain import validate_filters
    from sidecar.config import SidecarConfig, build_dataclass

    raw = {
        "service": {"name": "payment"},
        "filters": {"inbound": [{"name": "wasm", "config": {"path": str(path)}}]},
    }
    cfg = build_dataclass(SidecarConfig, raw, "")
    with pytest.raises(ConfigError) as info:
        validate_filters(cfg)
    return str(info.value)


def test_not_wasm_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    bogus = tmp_path / "filter.wasm"
    bogus.write_text("this is not WebAssembly\n")
    message = _config_error(bogus)
    assert "filters.inbound[0].config (wasm)" in message
    assert "path" in message and "not a WebAssembly module" in message


def test_missing_file_and_non_proxy_wasm_module_are_config_errors(tmp_path: Path) -> None:
    assert "cannot read" in _config_error(tmp_path / "absent.wasm")
    plain = tmp_path / "plain.wat"
    plain.write_text('(module (memory (export "memory") 1))')
    assert "not a proxy-wasm module" in _config_error(plain)


def test_configuration_rejected_by_the_root_context_is_a_config_error(tmp_path: Path) -> None:
    rejecting = tmp_path / "reject.wat"
    rejecting.write_text(
        '(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))'
        ' (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0)))'
    )
    assert "failed to start" in _config_error(rejecting)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_cpu_ms"):
        WasmConfig(path="x.wat", max_cpu_ms=0).validate()
    with pytest.raises(ValueError, match="log_level"):
        WasmConfig(path="x.wat", log_level="chatty").validate()


def test_public_api_boundary_gives_the_same_results(runtime: WasmRuntime) -> None:
    from filters.wasm.filter import WasmFilter, load_plugin

    config = WasmConfig(path=str(FIXTURES / "headers_ops.wat"), root_id="r")
    ctx = FilterContext("outbound", "payment", extra={"wasm_runtime": runtime})
    slow = WasmFilter(load_plugin(config, ctx, "wasm", native=False), False, False)
    fast = WasmFilter(load_plugin(config, ctx, "wasm", native=True), False, False)
    request = [(b"x-a", b"old"), (b"x-b", b"gone")]
    (slow_resp, slow_term), (fast_resp, fast_term) = (
        call_through(slow, request),
        call_through(fast, request),
    )
    assert slow_resp.headers == fast_resp.headers
    assert slow_term.headers == fast_term.headers
    asyncio.run(asyncio.sleep(0))  # nothing left pending on a loop


def test_a_trap_while_paused_fails_the_paused_call_at_once(runtime: WasmRuntime) -> None:
    import time

    flt = build(FIXTURES / "pause_then_trap.wat", runtime)
    started = time.monotonic()
    response, terminal = call_through(flt)
    assert response.status == 500
    assert terminal.calls == 0
    assert time.monotonic() - started < 5  # far below the 30 s pause limit


def test_bodies_are_read_and_rewritten_when_buffered(runtime: WasmRuntime) -> None:
    from sidecar.chain import compose
    from tests.unit.chain_helpers import Terminal, make_call

    flt = build(FIXTURES / "body.wat", runtime, buffer_bodies=True)
    terminal = Terminal()

    async def go() -> tuple[int, bytes, dict[bytes, bytes]]:
        response = await compose([flt], terminal)(make_call(body=b"original"))
        body = b""
        while chunk := await response.body.read():
            body += chunk
        return response.status, body, dict(response.headers)

    status, body, headers = asyncio.run(go())
    assert status == 200
    assert terminal.bodies == [b"REPLACED"]
    assert (b"x-body-was", b"original") in terminal.headers[0]
    assert body == b"from upstream + wasm"
    assert headers[b"content-length"] == str(len(body)).encode()


def test_bodies_are_left_alone_unless_buffer_bodies(runtime: WasmRuntime) -> None:
    flt = build(FIXTURES / "body.wat", runtime)
    response, terminal = call_through(flt, body=b"keep me")
    assert terminal.bodies == [b"keep me"]  # went through untouched
    assert response.body.buffered_whole == b"from upstream"


def test_what_a_filter_sees_and_how_its_edits_land(runtime: WasmRuntime) -> None:
    from sidecar.chain import compose
    from tests.unit.chain_helpers import Terminal, make_call

    flt = build(FIXTURES / "maps_probe.wat", runtime)
    terminal = Terminal()
    call = make_call(headers=[(b"x-a", b"A1"), (b"other", b"o")])

    async def go() -> Response:
        return await compose([flt], terminal)(call)

    response = asyncio.run(go())
    # num_headers counts the four request pseudo-headers; an empty body is end_of_stream.
    assert terminal.headers[0] == [
        (b"x-a", b"A1"),
        (b"other", b"o"),
        (b"x-seen-path", b"/echo"),
        (b"x-upper", b"v"),
        (b"x-n", b"6"),
        (b"x-eos", b"1"),
    ]
    assert call.authority == b"rewritten"
    assert response.status == 201
    assert response.headers == [
        (b"x-terminal", b"yes"),
        (b"x-status-was", b"200"),
        (b"x-resp-n", b"2"),
        (b"x-prop-a", b"A1"),
        (b"x-dest", b"127.0.0.1:9"),
    ]


def test_a_callback_declared_with_fewer_parameters_is_still_called(
    runtime: WasmRuntime, tmp_path: Path
) -> None:
    """The native boundary passes an export the arguments it declares (here no
    end_of_stream), as it always did; no write goes past the export's value slots."""
    module = tmp_path / "two_params.wat"
    module.write_text(
        '(module (import "env" "proxy_add_header_map_value"'
        " (func $add (param i32 i32 i32 i32 i32) (result i32)))"
        ' (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))'
        ' (data (i32.const 16) "x-n")'
        ' (func (export "proxy_on_response_headers") (param i32 i32) (result i32)'
        " (i32.store8 (i32.const 32) (i32.add (i32.const 48) (local.get 1)))"
        " (drop (call $add (i32.const 2) (i32.const 16) (i32.const 3) (i32.const 32)"
        " (i32.const 1))) (i32.const 0)))"
    )
    response, _ = call_through(build(module, runtime))
    assert response.status == 200
    assert (b"x-n", b"2") in response.headers  # num_headers: :status and x-terminal
