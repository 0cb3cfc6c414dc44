"""The `opus-sidecar` CLI as a real process: config checks and refusing a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from sidecar import __version__, cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

GOOD = """
service: {name: inventory}
listeners:
  outbound: {host: 127.0.0.1, port: 0}
  inbound: {host: 127.0.0.1, port: 0}
  admin: {host: 127.0.0.1, port: 0}
routes:
  - {prefix: /inventory/, service: inventory}
"""

BAD = """
service: {name: inventory}
upstream:
  max_per_route: abc
"""


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A clean OPUS_* environment, so the developer's shell cannot change the outcome.
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPUS_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=30,
    )


@pytest.fixture
def good(tmp_path: Path) -> str:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return str(path)


@pytest.fixture
def bad(tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return str(path)


def test_check_config_accepts_a_good_file(good: str) -> None:
    result = sidecar("check-config", good)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"OK: {good}"
    assert "service=inventory" in lines[1]
    assert "routes=1" in lines[1]
    assert result.stderr == ""


def test_check_config_rejects_a_bad_file(bad: str) -> None:
    result = sidecar("check-config", bad)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"opus-sidecar: error: {bad}: config key 'upstream.max_per_route': "
        "must be an integer >= 1, got 'abc'"
    )


def test_check_config_checks_route_rules(tmp_path: Path) -> None:
    good = tmp_path / "rules.yaml"
    good.write_text(
        "services:\n  inventory:\n    subsets: {v2: {version: v2}}\n"
        "    route_rules: [{name: canary, destinations: [{subset: v2}]}]\n"
        "route_rules: [{name: chaos, fault: {abort: {http_status: 503}}}]\n"
    )
    result = sidecar("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "route_rules=2" in result.stdout
    bad = tmp_path / "bad-rules.yaml"
    bad.write_text("route_rules: [{name: r, match: {path: {regex: '(['}}}]\n")
    result = sidecar("check-config", str(bad))
    assert result.returncode == 2
    assert "config key 'route_rules[0].match.path.regex': is not a valid regular" in result.stderr


def test_check_config_names_a_bad_env_var(good: str) -> None:
    result = sidecar("check-config", good, env={"OPUS_APP_PORT": "http"})
    assert result.returncode == 2
    assert "config key 'app.port' (from OPUS_APP_PORT)" in result.stderr


def test_check_config_warns_about_unknown_env_vars(good: str) -> None:
    result = sidecar(
        "check-config",
        good,
        env={"OPUS_LOG_LEVL": "debug", "OPUS_SIDECAR_URL": "http://127.0.0.1:1"},
    )
    assert result.returncode == 0
    assert "OPUS_LOG_LEVL (did you mean OPUS_LOG_LEVEL?)" in result.stderr
    assert "OPUS_SIDECAR_URL" not in result.stderr


def test_check_config_running_says_what_a_reload_would_do(good: str, tmp_path: Path) -> None:
    moved = tmp_path / "moved.yaml"
    moved.write_text(
        GOOD.replace(
            "outbound: {host: 127.0.0.1, port: 0}", "outbound: {host: 127.0.0.1, port: 18080}"
        )
    )
    result = sidecar("check-config", str(moved), "--running", good)
    assert result.returncode == 0, result.stderr
    assert "changes listeners.outbound.port" in result.stdout
    assert "rebinds: outbound" in result.stdout
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(GOOD.replace("name: inventory", "name: stock"))
    result = sidecar("check-config", str(renamed), "--running", good)
    assert result.returncode == 3
    assert "reload refused: service.name cannot change without a restart" in result.stderr


def test_run_with_a_bad_config_exits_before_loading_the_server(bad: str) -> None:
    started = time.monotonic()
    # -X importtime lists every module imported, so the server's absence is observable.
    result = subprocess_importtime("run", "--config", bad)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert "config key 'upstream.max_per_route'" in result.stderr
    assert "sidecar.server" not in result.stderr
    assert "sidecar.config" in result.stderr  # the import listing did work
    assert elapsed < 10


def subprocess_importtime(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPUS_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_run_with_a_missing_config_file(tmp_path: Path) -> None:
    result = sidecar("run", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml: cannot read config file" in result.stderr


def test_version_and_usage_errors() -> None:
    version = sidecar("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"opus-sidecar {__version__}"
    assert sidecar().returncode == 2
    assert sidecar("run", "--no-such-flag").returncode == 2


def test_demo_gets_the_remaining_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process with a stand-in module: this checks the CLI's hand-off, not the demo.
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setitem(sys.modules, "sidecar.demo", types.SimpleNamespace(main=fake_main))
    assert cli.main(["demo", "--once", "--requests", "5", "-h", "--version"]) == 7
    assert cli.main(["demo"]) == 7
    assert seen == [["--once", "--requests", "5", "-h", "--version"], []]
