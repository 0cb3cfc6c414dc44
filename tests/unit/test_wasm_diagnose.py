"""A filter that fails to start for want of root_id or configuration says so, in one line.

tests/wasm_fixtures/sdk_start.wat starts as an AssemblyScript SDK filter does when one is
missing (a critical log then proc_exit; a memory fault in proxy_on_configure); the real
SDK builds are run in tests/integration/test_wasm_mesh.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from filters.wasm import cli
from filters.wasm.diagnose import Misconfigured
from filters.wasm.filter import WasmConfig, load_plugin
from filters.wasm.runtime import WasmRuntime
from sidecar.chain import FilterContext
from tests.unit.test_wasm_support import FIXTURES

SDK_START = str(FIXTURES / "sdk_start.wat")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["run", SDK_START, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _last_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


def test_run_without_root_id_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--plugin-config", "x")
    assert code == cli.MISCONFIGURED
    line = _last_line(err)
    assert line.startswith("opus-sidecar wasm: ")
    assert "--root-id NAME" in line and "Envoy's root_id" in line
    assert "backtrace" not in out and "backtrace" not in err
    assert "Missing root context factory" in out  # the guest's own log is still shown


def test_run_without_plugin_config_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--root-id", "r")
    assert code == cli.MISCONFIGURED
    line = _last_line(err)
    assert "--plugin-config" in line and "Envoy's configuration" in line
    assert "memory fault" not in out and "backtrace" not in out


def test_run_with_both_serves(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--root-id", "r", "--plugin-config", "x")
    assert code == 0
    assert "+ header x-started: yes" in out


def test_the_sidecars_load_error_names_the_key(tmp_path: Path) -> None:
    config = WasmConfig(path=SDK_START, configuration="x", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^root_id: the filter failed to start: .*root_id"):
        config.validate()
    config = WasmConfig(path=SDK_START, root_id="r", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^configuration: the filter failed to start"):
        config.validate()


@pytest.mark.parametrize("native", [True, False])
def test_both_boundaries_see_the_memory_fault(native: bool) -> None:
    runtime = WasmRuntime(cache_dir=None)
    ctx = FilterContext("outbound", "payment", extra={"wasm_runtime": runtime})
    plugin = load_plugin(WasmConfig(path=SDK_START, root_id="r"), ctx, "wasm", native=native)
    try:
        with pytest.raises(Misconfigured) as info:
            plugin.acquire()
        assert info.value.key == "configuration"
    finally:
        plugin.close()
        runtime.close()


def test_other_start_failures_are_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", str(FIXTURES / "trap.wat"), "--request-header", "x-trap:1"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "--root-id" not in err and "--plugin-config" not in err
