"""Filter chains in real sidecar processes, with filters from a third-party distribution.

tests/fixtures/opus-filter-example is pip-installed (as a wheel, into a directory of its
own) and reaches the sidecar only through PYTHONPATH and its `opus.filters` entry points,
as a user's package would: `stamp` sets a header each way, `explode` raises on demand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.chain import BUILTIN_FILTERS
from tests.integration.conftest import REPO, Mesh, Sidecar

pytestmark = pytest.mark.integration

FIXTURE_PACKAGE = REPO / "tests" / "fixtures" / "opus-filter-example"


@pytest.fixture(scope="module")
def filter_site(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The fixture package installed by pip into its own directory, offline.

    --no-build-isolation with the package's in-tree, stdlib-only backend: nothing is
    fetched, and the venv's setuptools (which may lack `bdist_wheel`) is not involved.
    """
    site = tmp_path_factory.mktemp("filter-site")
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
            "--no-index", "--no-cache-dir", "--target", str(site), str(FIXTURE_PACKAGE),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    entry_points = next(site.glob("opus_filter_example-*.dist-info")) / "entry_points.txt"
    assert "stamp = opus_filter_example:factory" in entry_points.read_text()
    return str(site)


def _caller(mesh: Mesh, site: str, extra: dict[str, Any]) -> Sidecar:
    app = mesh.app("payment")
    return mesh.sidecar("payment", app.ports["port"], extra, env={"PYTHONPATH": site})


def _stamp(value: str) -> dict[str, Any]:
    return {
        "name": "stamp",
        "config": {"request_header": "x-stamp", "response_header": "x-stamped", "value": value},
    }


def test_a_filter_from_an_installed_package_stamps_request_and_response(
    mesh: Mesh, filter_site: str
) -> None:
    assert "stamp" not in BUILTIN_FILTERS  # found through the entry point, nowhere else
    mesh.service("inventory")
    payment = _caller(mesh, filter_site, {"filters": {"outbound": [_stamp("blue")]}})
    mesh.wait_endpoints(payment, "inventory", 1)
    stamped = payment.metric("opus_example_stamps_total", service="inventory")  # the probes'

    resp = httpx.post(f"{payment.outbound}/v1/invoke/inventory/orders", content=b"{}", timeout=10)

    assert resp.status_code == 200, resp.text
    echoed = resp.json()
    assert echoed["app"] == "inventory"
    assert echoed["headers"]["x-stamp"] == "blue"  # set on the way out, seen by the app
    assert resp.headers["x-stamped"] == "blue by payment"  # set on the way back
    assert resp.headers["x-app"] == "inventory"
    # A metric the package declared through FilterContext.metrics, prefixed by the SDK.
    assert payment.metric("opus_example_stamps_total", service="inventory") == stamped + 1


def test_a_raising_filter_fails_only_its_call(mesh: Mesh, filter_site: str) -> None:
    mesh.service("inventory")
    mesh.service("catalog")
    payment = _caller(
        mesh,
        filter_site,
        {
            "filters": {"outbound": [{"name": "explode"}]},
            "services": {"catalog": {"filters": [_stamp("catalog")]}},
        },
    )
    mesh.wait_endpoints(payment, "inventory", 1)
    mesh.wait_endpoints(payment, "catalog", 1)
    boom = {"x-explode": "1"}

    failed = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", headers=boom, timeout=10)

    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/json"
    assert failed.headers["x-opus-error"] == "FE"
    assert failed.json() == {
        "error": "filter 'explode' failed",
        "status": 500,
        "service": "inventory",
    }
    log = payment.output()
    assert "filter 'explode' failed on a call to inventory" in log
    assert "RuntimeError: exploded on the request, as asked" in log  # with its traceback
    assert payment.metric("opus_filter_errors_total", filter="explode") == 1
    assert payment.metric("opus_local_replies_total", filter="explode", code="500") == 1

    # The worker and the chain survive: the next call through the same chain succeeds ...
    ok = httpx.get(f"{payment.outbound}/v1/invoke/inventory/y", timeout=10)
    assert ok.status_code == 200, ok.text
    assert ok.json()["app"] == "inventory"
    # ... and a service with its own chain never runs the raising filter.
    other = httpx.get(f"{payment.outbound}/v1/invoke/catalog/z", headers=boom, timeout=10)
    assert other.status_code == 200, other.text
    assert other.json()["app"] == "catalog"
    assert other.headers["x-stamped"] == "catalog by payment"
    assert payment.metric("opus_filter_errors_total", filter="explode") == 1


def test_per_service_and_per_route_chains_apply_only_where_configured(
    mesh: Mesh, filter_site: str
) -> None:
    mesh.service("inventory")
    mesh.service("catalog")
    payment = _caller(
        mesh,
        filter_site,
        {
            "filters": {"outbound": [_stamp("listener")]},
            "services": {"inventory": {"filters": [_stamp("inventory-only")]}},
            "routes": [{"prefix": "/shop/", "service": "catalog", "filters": [_stamp("route")]}],
        },
    )
    mesh.wait_endpoints(payment, "inventory", 1)
    mesh.wait_endpoints(payment, "catalog", 1)

    def stamped(path: str) -> tuple[str, str, str]:
        resp = httpx.get(f"{payment.outbound}{path}", timeout=10)
        assert resp.status_code == 200, resp.text
        echoed = resp.json()
        return echoed["app"], echoed["headers"]["x-stamp"], resp.headers["x-stamped"]

    assert stamped("/v1/invoke/inventory/a") == (
        "inventory",
        "inventory-only",
        "inventory-only by payment",
    )
    assert stamped("/v1/invoke/catalog/b") == ("catalog", "listener", "listener by payment")
    assert stamped("/shop/c") == ("catalog", "route", "route by payment")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (
            [{"name": "stamp", "config": {"colour": "red"}}],
            # The known keys come from the installed package's config dataclass.
            "config key 'filters.outbound[0].config (stamp).colour': "
            "unknown key; known keys: request_header, response_header, value",
        ),
        (
            [{"name": "stamp", "config": {"request_header": "X Stamp"}}],
            "config key 'filters.outbound[0].config (stamp)': "
            "request_header must be a lower-case header name, got 'X Stamp'",
        ),
        (
            [_stamp("ok"), {"name": "stomp"}],
            # Built-ins first, then what the installed entry points add.
            "config key 'filters.outbound[1].name': unknown filter 'stomp'; known filters: "
            + ", ".join([*sorted(BUILTIN_FILTERS), "explode", "stamp"]),
        ),
    ],
)
def test_a_bad_filter_config_stops_the_sidecar_before_it_binds(
    tmp_path: Path, filter_site: str, filters: list[dict[str, Any]], expected: str
) -> None:
    config = {
        "service": {"name": "payment"},
        "listeners": {
            "outbound": {"host": "127.0.0.1", "port": 0},
            "inbound": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "discovery": {"backend": "file", "file": {"directory": str(tmp_path / "registry")}},
        "filters": {"outbound": filters},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    ports_file = tmp_path / "ports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPUS_")}
    env["PYTHONPATH"] = filter_site

    # -X importtime lists every module imported, so the server's absence is observable.
    result = subprocess.run(
        [
            sys.executable, "-X", "importtime", "-m", "sidecar", "run",
            "--config", str(path), "--ports-file", str(ports_file),
        ],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=30,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr
    assert "sidecar.server" not in result.stderr  # never got as far as the server
    assert not ports_file.exists()
