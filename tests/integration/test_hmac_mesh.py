"""HMAC signing across real sidecars: payment signs outbound (hmac_sign), inventory checks
inbound (hmac_verify), both reading one key file; calls that bypass the signer are sent
straight to inventory's inbound listener with httpx."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar import signing
from tests.integration.conftest import Mesh, Proc, Sidecar

pytestmark = pytest.mark.integration

SECRETS = {"k1": "integration-k1-secret", "k2": "integration-k2-secret"}


def write_keys(path: Path, keys: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    os.replace(tmp, path)  # atomic, as a secret manager's agent writes it


def sign_config(keys: Path, key_id: str = "k1") -> dict[str, Any]:
    config = {"key_file": str(keys), "key_id": key_id, "reload_interval": 0.1}
    return {"filters": {"outbound": [{"name": "hmac_sign", "config": config}]}}


def verify_config(keys: Path) -> dict[str, Any]:
    config = {"key_file": str(keys), "reload_interval": 0.1}
    return {"filters": {"inbound": [{"name": "hmac_verify", "config": config}]}}


def app_calls(app: Proc) -> int:
    count: int = httpx.get(f"http://127.0.0.1:{app.ports['port']}/calls", timeout=5).json()["calls"]
    return count


def signed_headers(
    key_id: str, path: str, body: bytes, ts: int | None = None, method: str = "POST"
) -> dict[str, str]:
    timestamp = int(time.time()) if ts is None else ts
    sig = signing.sign(SECRETS[key_id].encode(), method, path, timestamp, body)
    return {
        signing.SIGNATURE_HEADER: sig,
        signing.TIMESTAMP_HEADER: str(timestamp),
        signing.KEY_ID_HEADER: key_id,
    }


def assert_refused(response: httpx.Response, text: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["x-opus-error"] == "AUTH"
    assert text in response.json()["error"]


def wait_for_access_flag(mesh: Mesh, sidecar: Sidecar, flags: str, count: int) -> None:
    """The access line is written just after the reply is sent: poll for it."""
    path = mesh.workdir / f"{sidecar.name}.access.log"
    deadline = time.monotonic() + 5
    seen = 0
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        seen = sum(1 for line in lines if json.loads(line)["flags"] == flags)
        if seen >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{seen} access lines flagged {flags!r} at {sidecar.name}, wanted {count}")


def start_pair(mesh: Mesh, keys: Path, key_id: str = "k1") -> tuple[Proc, Sidecar, Sidecar]:
    inventory_app, inventory = mesh.service("inventory", verify_config(keys))
    _, payment = mesh.service("payment", sign_config(keys, key_id))
    mesh.wait_endpoints(payment, "inventory", 1)
    return inventory_app, inventory, payment


def test_signed_calls_pass_through_the_mesh(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, {"k1": SECRETS["k1"]})
    inventory_app, inventory, payment = start_pair(mesh, keys)
    before = app_calls(inventory_app)
    for i in range(3):
        body = json.dumps({"item": f"sku-{i}"}).encode()
        resp = httpx.post(
            f"{payment.outbound}/v1/invoke/inventory/reserve?trace={i}", content=body, timeout=10
        )
        assert resp.status_code == 200, resp.text
        echoed = resp.json()
        headers = echoed["headers"]
        # Signed over the path the upstream saw, not the /v1/invoke form the app sent.
        assert echoed["path"] == f"/reserve?trace={i}"
        expected = signing.sign(
            SECRETS["k1"].encode(),
            "POST",
            f"/reserve?trace={i}",
            int(headers["x-opus-timestamp"]),
            body,
        )
        assert headers["x-opus-signature"] == expected
        assert headers["x-opus-key-id"] == "k1"
        assert abs(int(headers["x-opus-timestamp"]) - time.time()) < 60
    assert app_calls(inventory_app) == before + 3
    assert inventory.metric("opus_hmac_failures_total", reason="bad_signature") == 0


def test_calls_bypassing_the_signer_never_reach_the_app(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, {"k1": SECRETS["k1"]})
    inventory_app, inventory = mesh.service("inventory", verify_config(keys))
    url = f"{inventory.inbound}/reserve"
    body = b'{"item":"sku-1"}'

    assert_refused(httpx.post(url, content=body, timeout=10), "missing")
    tampered = signed_headers("k1", "/reserve", b'{"item":"sku-2"}')
    assert_refused(httpx.post(url, content=body, headers=tampered, timeout=10), "does not match")
    stale = signed_headers("k1", "/reserve", body, ts=int(time.time()) - 1000)
    assert_refused(httpx.post(url, content=body, headers=stale, timeout=10), "old")
    assert app_calls(inventory_app) == 0
    wait_for_access_flag(mesh, inventory, "AUTH:hmac_verify", 3)

    once = signed_headers("k1", "/reserve", body)
    assert httpx.post(url, content=body, headers=once, timeout=10).status_code == 200
    assert_refused(httpx.post(url, content=body, headers=once, timeout=10), "replay")
    assert app_calls(inventory_app) == 1  # only the first of the two identical calls
    for reason in ("missing", "bad_signature", "stale", "replay"):
        assert inventory.metric("opus_hmac_failures_total", reason=reason) == 1, reason


def test_key_rotation_with_two_live_keys(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, SECRETS)
    inventory_app, inventory, payment = start_pair(mesh, keys, key_id="k2")
    resp = httpx.post(f"{payment.outbound}/v1/invoke/inventory/pay?n=1", content=b"a", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["headers"]["x-opus-key-id"] == "k2"
    # Callers still on k1 pass while both keys are live.
    inbound = f"{inventory.inbound}/pay?n=2"
    old = signed_headers("k1", "/pay?n=2", b"b")
    assert httpx.post(inbound, content=b"b", headers=old, timeout=10).status_code == 200

    write_keys(keys, {"k2": SECRETS["k2"]})
    # The readiness signal: the verifier refuses k1 once it has re-read the file.
    deadline = time.monotonic() + 5
    attempt = 0
    while True:
        attempt += 1
        path = f"/pay?probe={attempt}"
        probe = signed_headers("k1", path, b"c")
        status = httpx.post(f"{inventory.inbound}{path}", content=b"c", headers=probe, timeout=10)
        if status.status_code == 401:
            assert_refused(status, "unknown key id 'k1'")
            break
        assert time.monotonic() < deadline, "the verifier never dropped k1"
        time.sleep(0.05)
    resp = httpx.post(f"{payment.outbound}/v1/invoke/inventory/pay?n=3", content=b"d", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["headers"]["x-opus-key-id"] == "k2"
    assert app_calls(inventory_app) == 2 + (attempt - 1) + 1


def test_app_signed_call_is_preserved_and_accepted(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, SECRETS)
    _, _, payment = start_pair(mesh, keys)
    body = b'{"amount":10}'
    # The seed's app code: sign the request as the upstream will see it, then send it
    # through the local sidecar by Host (as `POST http://inventory/reserve`).
    ts = int(time.time()) - 30  # not a second the sidecar itself would sign with
    app_headers = signed_headers("k2", "/reserve?from=app", body, ts=ts)
    resp = httpx.post(
        f"{payment.outbound}/reserve?from=app",
        content=body,
        headers={**app_headers, "host": "inventory"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    seen = resp.json()["headers"]
    assert seen["x-opus-signature"] == app_headers[signing.SIGNATURE_HEADER]
    assert seen["x-opus-timestamp"] == str(ts)
    assert seen["x-opus-key-id"] == "k2"
