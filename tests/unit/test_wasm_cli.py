"""`opus-sidecar wasm run|inspect`, called in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli import main
from tests.unit.test_wasm_support import EXAMPLES, FIXTURES


def test_run_reports_a_local_reply(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["wasm", "run", str(EXAMPLES / "wat" / "add_header.wat"),
                 "--request-header", "x-deny: true"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "local reply: 403" in out
    assert "forbidden by wat" in out


def test_run_reports_header_changes_logs_and_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["wasm", "run", str(EXAMPLES / "wat" / "count_calls.wat")])
    out = capsys.readouterr().out
    assert code == 0
    assert "[debug] counted a call" in out
    assert "wat_calls_total = 1" in out
    code = main(["wasm", "run", str(EXAMPLES / "wat" / "add_header.wat")])
    assert "+ header x-wat-filter: hello-from-wat" in capsys.readouterr().out


def test_run_reports_a_trap(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["wasm", "run", str(FIXTURES / "trap.wat"), "--request-header", "x-trap:1"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out


def test_run_reads_plugin_config_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"k": 1}')
    code = main(["wasm", "run", str(FIXTURES / "abi_010.wat"), "--plugin-config", f"@{config}"])
    assert code == 0
    assert '+ header x-config: {"k": 1}' in capsys.readouterr().out


def test_inspect_lists_abi_imports_and_unimplemented(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["wasm", "inspect", str(FIXTURES / "unknown_import.wat")])
    out = capsys.readouterr().out
    assert code == 0
    assert "proxy-wasm ABI 0.2.0" in out
    assert "env.proxy_add_header_map_value (i32, i32, i32, i32, i32) -> (i32)" in out
    assert "unimplemented imports: env.proxy_made_up, env.proxy_grpc_call, elsewhere.thing" in out


def test_inspect_of_a_non_proxy_wasm_module_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.wat"
    plain.write_text("(module)")
    assert main(["wasm", "inspect", str(plain)]) == 1
    assert "not a proxy-wasm module" in capsys.readouterr().out
