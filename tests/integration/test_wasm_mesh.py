"""proxy-wasm filters in real sidecar processes.

The AssemblyScript examples are built once per session with npm (wasm_examples/build.sh,
`npm ci` against the lockfile) and run in a two-sidecar mesh; the WAT fixtures are
assembled by the sidecar when it loads them. Misbehaving filters must cost only their call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import REPO, Mesh

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "wasm_examples"
BUILD = EXAMPLES / "build"
FIXTURES = REPO / "tests" / "wasm_fixtures"
OFFLINE_MARKERS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "network")


@pytest.fixture(scope="session")
def as_filters() -> Path:
    """wasm_examples/build/*.wasm, built by build.sh (idempotent: quick when up to date)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the AssemblyScript examples cannot be built")
    result = subprocess.run(
        ["bash", str(EXAMPLES / "build.sh")], capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(marker in output for marker in OFFLINE_MARKERS):
        pytest.skip(f"the npm registry is unreachable: {output[-500:]}")
    assert result.returncode == 0, output[-3000:]
    for name in ("add_header", "deny_403", "rewrite_header", "count_calls"):
        assert (BUILD / f"{name}.wasm").read_bytes().startswith(b"\0asm")
    return BUILD


def _wasm(path: Path, **config: Any) -> dict[str, Any]:
    return {"name": "wasm", "config": {"path": str(path), **config}}


def _cache(mesh: Mesh) -> dict[str, str]:
    return {"cache_dir": str(mesh.workdir / "wasm-cache")}


@pytest.mark.timeout(600)  # a cold build (npm ci, four optimized asc runs) takes minutes
def test_assemblyscript_filters_in_a_two_sidecar_mesh(mesh: Mesh, as_filters: Path) -> None:
    mesh.service("inventory")
    cache = _cache(mesh)
    chain = [
        _wasm(as_filters / "add_header.wasm", root_id="add_header", configuration="from-wasm", **cache),
        _wasm(as_filters / "deny_403.wasm", root_id="deny_403", **cache),
        _wasm(as_filters / "rewrite_header.wasm", root_id="rewrite_header",
              configuration={"header": "x-env", "value": "prod"}, **cache),
        _wasm(as_filters / "count_calls.wasm", root_id="count_calls", **cache),
    ]  # fmt: skip
    app = mesh.app("payment")
    payment = mesh.sidecar("payment", app.ports["port"], {"filters": {"outbound": chain}})
    mesh.wait_endpoints(payment, "inventory", 1)
    before = payment.metric("wasm_calls_total")

    ok = httpx.get(
        f"{payment.outbound}/v1/invoke/inventory/items", headers={"x-env": "dev"}, timeout=10
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["app"] == "inventory"  # reached the other side of the mesh
    assert ok.headers["hello"] == "from-wasm"  # add_header, on the way back
    assert ok.json()["headers"]["x-env"] == "prod"  # rewrite_header, from JSON configuration

    denied = httpx.get(
        f"{payment.outbound}/v1/invoke/inventory/items", headers={"x-deny": "true"}, timeout=10
    )
    assert denied.status_code == 403
    assert denied.text == "forbidden\n"
    assert denied.headers["x-denied-by"] == "deny_403"

    # count_calls sits after deny_403: the denied call never reached it
    assert payment.metric("wasm_calls_total", filter="count_calls") == before + 1
    assert payment.metric("opus_wasm_traps_total") == 0
    records = payment.access_log(count=3)
    assert any(r.get("status") == 403 for r in records)


def test_misbehaving_filters_cost_only_their_call(mesh: Mesh) -> None:
    mesh.service("inventory")
    cache = _cache(mesh)
    chain = [
        _wasm(FIXTURES / "loop.wat", max_cpu_ms=50, **cache),
        _wasm(FIXTURES / "grow.wat", max_memory_mb=8, **cache),
        _wasm(FIXTURES / "unknown_import.wat", **cache),
        _wasm(FIXTURES / "trap.wat", **cache),
    ]
    app = mesh.app("payment")
    payment = mesh.sidecar("payment", app.ports["port"], {"filters": {"outbound": chain}})
    mesh.wait_endpoints(payment, "inventory", 1)
    url = f"{payment.outbound}/v1/invoke/inventory/items"

    for header in ("x-loop", "x-grow", "x-trap"):
        failed = httpx.get(url, headers={header: "1"}, timeout=10)
        assert failed.status_code == 500, (header, failed.text)
        served = httpx.get(url, timeout=10)  # a fresh instance serves the next call
        assert served.status_code == 200, (header, served.text)
        assert served.headers["x-trap-filter"] == "ok"
        assert served.headers["x-unimplemented"] == "yes"  # loaded despite unknown imports

    assert payment.metric("opus_wasm_traps_total") == 3
    assert httpx.get(f"{payment.admin}/ready", timeout=5).status_code == 200
    assert payment.proc.poll() is None  # the sidecar never died
    output = payment.output()
    assert output.count("does not implement") == 1  # reported once, not per call
    assert "trapped; its instance is replaced" in output


def test_fail_open_passes_the_call_untouched(mesh: Mesh) -> None:
    mesh.service("inventory")
    chain = [_wasm(FIXTURES / "trap.wat", fail_open=True, **_cache(mesh))]
    app = mesh.app("payment")
    payment = mesh.sidecar("payment", app.ports["port"], {"filters": {"outbound": chain}})
    mesh.wait_endpoints(payment, "inventory", 1)

    resp = httpx.get(
        f"{payment.outbound}/v1/invoke/inventory/items", headers={"x-trap": "1"}, timeout=10
    )
    assert resp.status_code == 200
    assert resp.json()["headers"]["x-trap"] == "1"
    assert "x-trap-filter" not in resp.headers
    assert payment.metric("opus_wasm_traps_total") == 1


def test_http_callout_pauses_and_resumes_the_call(mesh: Mesh) -> None:
    callee_app = mesh.app("callee")
    mesh.service("inventory")
    upstreams = {"callee": f"http://127.0.0.1:{callee_app.ports['port']}"}
    chain = [
        _wasm(FIXTURES / "http_call.wat", upstreams=upstreams, **_cache(mesh)),
        _wasm(FIXTURES / "pause_tick.wat", **_cache(mesh)),
    ]
    app = mesh.app("payment")
    payment = mesh.sidecar("payment", app.ports["port"], {"filters": {"outbound": chain}})
    mesh.wait_endpoints(payment, "inventory", 1)

    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/items", timeout=10)
    assert resp.status_code == 200, resp.text
    seen = resp.json()["headers"]
    assert seen["x-callout-status"] == "200"  # the callout really reached the callee app
    assert seen["x-resumed-by"] == "tick"  # paused, then continued from proxy_on_tick


def test_http_callout_through_a_sidecars_outbound_listener(mesh: Mesh) -> None:
    """An `upstreams` entry naming a sidecar's outbound listener: the callout is routed
    by its :authority (`callee`) through the mesh like any call."""
    mesh.service("callee")
    _, gateway = mesh.service("gateway")
    mesh.wait_endpoints(gateway, "callee", 1)
    mesh.service("inventory")
    chain = [
        _wasm(FIXTURES / "http_call.wat", upstreams={"callee": gateway.outbound}, **_cache(mesh))
    ]
    app = mesh.app("payment")
    payment = mesh.sidecar("payment", app.ports["port"], {"filters": {"outbound": chain}})
    mesh.wait_endpoints(payment, "inventory", 1)

    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/items", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["headers"]["x-callout-status"] == "200"
    records = gateway.access_log(count=2)
    assert any(r["service"] == "callee" and r["path"] == "/callout" for r in records), records


@pytest.mark.skipif(
    not Path("/usr/lib/rustlib/wasm32-unknown-unknown").exists(),
    reason="Debian's rustc with libstd-rust-dev-wasm32 is not installed",
)
@pytest.mark.timeout(300)
def test_rust_filter_sets_a_header_and_counts(mesh: Mesh) -> None:
    result = subprocess.run(
        ["bash", str(EXAMPLES / "rust" / "build.sh")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    mesh.service("inventory")
    config = {"header": "x-served-by", "value": "rust"}
    chain = [
        _wasm(
            BUILD / "set_header_rust.wasm", name="rust-edge", configuration=config, **_cache(mesh)
        )
    ]
    app = mesh.app("payment")
    payment = mesh.sidecar("payment", app.ports["port"], {"filters": {"outbound": chain}})
    mesh.wait_endpoints(payment, "inventory", 1)
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/items", timeout=10)
    assert resp.headers["x-served-by"] == "rust"
    assert payment.metric("rust_responses_total", filter="rust-edge") >= 1


def test_not_wasm_stops_the_sidecar_before_it_binds(tmp_path: Path) -> None:
    bogus = tmp_path / "filter.wasm"
    bogus.write_text("not webassembly\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"name": "payment"},
        "filters": {"inbound": [{"name": "wasm", "config": {"path": str(bogus)}}]},
    }))  # fmt: skip
    check = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert check.returncode != 0
    assert "filters.inbound[0].config (wasm)" in check.stderr + check.stdout
    assert "not a WebAssembly module" in check.stderr + check.stdout

    ports = tmp_path / "ports.json"
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config), "--ports-file", str(ports)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert run.returncode != 0
    assert "not a WebAssembly module" in run.stderr + run.stdout
    assert not ports.exists()  # stopped before binding any port


def _wasm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "wasm", "run", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="session")
def sdk_default_configure(as_filters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/wasm_fixtures/sdk_default_configure.ts, built with the examples' SDK."""
    out = tmp_path_factory.mktemp("as") / "sdk_default_configure.wasm"
    source = FIXTURES / "sdk_default_configure.ts"
    build = subprocess.run(
        ["npx", "--no-install", "asc", str(source), "--path", "node_modules", "-b", str(out),
         "--use", "abort=abort_proc_exit", "--optimize"],
        capture_output=True, text=True, timeout=300, cwd=EXAMPLES,
    )  # fmt: skip
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    return out


@pytest.mark.timeout(600)  # as_filters: a cold build takes minutes
def test_sdk_filter_without_root_id_or_configuration_says_which(
    as_filters: Path, sdk_default_configure: Path, tmp_path: Path
) -> None:
    """What a new user hit: a trap backtrace (no --root-id) and a memory fault (no
    --plugin-config, the SDK's own onConfigure); now one line naming the setting."""
    no_root = _wasm_run(str(as_filters / "rewrite_header.wasm"))
    assert no_root.returncode == 3, no_root.stdout + no_root.stderr
    last = no_root.stderr.strip().splitlines()[-1]
    assert last.startswith("opus-sidecar wasm: ") and "--root-id NAME" in last
    assert "Envoy's root_id" in last and "backtrace" not in no_root.stdout

    no_config = _wasm_run(str(sdk_default_configure), "--root-id", "plain")
    assert no_config.returncode == 3, no_config.stdout + no_config.stderr
    last = no_config.stderr.strip().splitlines()[-1]
    assert "--plugin-config" in last and "Envoy's configuration" in last
    assert "memory fault" not in no_config.stdout

    served = _wasm_run(str(sdk_default_configure), "--root-id", "plain", "--plugin-config", "x")
    assert served.returncode == 0, served.stdout + served.stderr
    assert "+ header x-plain: 1" in served.stdout

    # The sidecar's own load error names the key.
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"name": "payment"},
        "filters": {"inbound": [_wasm(as_filters / "rewrite_header.wasm", cache_dir=str(tmp_path))]},
    }))  # fmt: skip
    check = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert check.returncode != 0
    assert "root_id: the filter failed to start" in check.stderr + check.stdout
