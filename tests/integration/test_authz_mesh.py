"""Authorization policy with real sidecars in strict mTLS (the dev CA): an allowed caller
served, a denied one answered 403 naming the rule while the app sees nothing, over the
h2c pool and the HTTP/1.1 one; a grpcio caller denied with PERMISSION_DENIED; permissive
mode with plaintext callers allowed and denied explicitly; and a live reload of the
rules taking effect on the next call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from sidecar.tls import devca
from tests.integration.conftest import Mesh, Proc
from tests.integration.mtls_helpers import TD

pytestmark = pytest.mark.integration


def _tls(mesh: Mesh, mode: str = "strict") -> dict[str, Any]:
    ca_dir = mesh.workdir / "devca"
    if not (ca_dir / devca.CA_CERT).exists():
        devca.init_ca(ca_dir, TD)
    return {"mode": mode, "trust_domain": TD, "source": "dev", "dev": {"ca_dir": str(ca_dir)}}


def _calls(app: Proc) -> int:
    calls: int = httpx.get(f"http://127.0.0.1:{app.ports['port']}/calls", timeout=5).json()["calls"]
    return calls


RULES = [
    {"name": "no-admin", "action": "DENY", "to": [{"paths": ["/admin/*"]}]},
    {"name": "payment-reads", "from": [{"services": ["payment"]}], "to": [{"methods": ["GET"]}]},
]


@pytest.mark.parametrize("protocol", ["h2c", "http1"])
def test_strict_mesh_serves_allowed_callers_and_denies_the_rest(mesh: Mesh, protocol: str) -> None:
    common = {"tls": _tls(mesh), "upstream": {"protocol": protocol}}
    app, inventory = mesh.service("inventory", {**common, "authorization": {"rules": RULES}})
    _, payment = mesh.service("payment", common)
    _, billing = mesh.service("billing", common)
    for caller in (payment, billing):
        mesh.wait_endpoints(caller, "inventory", 1)
    # billing's probe above was denied already: count from here.
    no_allow = inventory.metric("opus_authz_denied_total", rule="(no allow rule)")
    url = "/v1/invoke/inventory"
    with httpx.Client(timeout=10) as client:
        ok = client.get(f"{payment.outbound}{url}/echo")
        assert ok.status_code == 200, ok.text
        served = _calls(app)

        admin = client.get(f"{payment.outbound}{url}/admin/users")
        assert admin.status_code == 403
        assert "authorization rule 'no-admin'" in admin.json()["error"]
        post = client.post(f"{payment.outbound}{url}/echo", content=b"x")
        assert post.status_code == 403 and "no ALLOW rule" in post.json()["error"]
        other = client.get(f"{billing.outbound}{url}/echo")
        assert other.status_code == 403
        assert f"spiffe://{TD}/svc/billing" in other.json()["error"]
    assert _calls(app) == served  # nothing denied reached the app
    assert inventory.metric("opus_authz_denied_total", rule="no-admin") == 1
    assert inventory.metric("opus_authz_denied_total", rule="(no allow rule)") == no_allow + 2
    entries = inventory.access_log(4)
    assert [e["flags"] for e in entries[-3:]] == ["RBAC:authz"] * 3
    assert entries[-1]["peer_identity"] == f"spiffe://{TD}/svc/billing"
    assert entries[-1]["status"] == 403
    # The sidecar serves on.
    assert httpx.get(f"{payment.outbound}{url}/echo", timeout=10).status_code == 200


def test_grpc_callers_get_permission_denied(mesh: Mesh) -> None:
    app = Proc("grpc-app", [sys.executable, "-m", "tests.integration.grpc_app"], mesh.workdir, None)
    mesh.procs.append(app)
    rules = [{"name": "unary-only", "to": [{"grpc": ["test.Echo/Unary"]}]}]
    tls = _tls(mesh)
    inventory = mesh.sidecar(
        "inventory",
        app.ports["port"],
        {"app": {"protocol": "h2c"}, "tls": tls, "authorization": {"rules": rules}},
    )
    _, payment = mesh.service(
        "payment",
        {"tls": tls, "routes": [{"grpc_service": "test.Echo", "service": "inventory"}]},
    )
    mesh.wait_endpoints(payment, "inventory", 1)  # its HTTP probe is denied: not gRPC Unary
    before = inventory.metric("opus_authz_denied_total", rule="(no allow rule)")
    target = f"127.0.0.1:{payment.ports['outbound']}"
    options = [("grpc.default_authority", "inventory")]
    with grpc.insecure_channel(target, options=options) as channel:
        assert channel.unary_unary("/test.Echo/Unary")(b"hello", timeout=10) == b"hello"
        with pytest.raises(grpc.RpcError) as info:
            list(channel.unary_stream("/test.Echo/ServerStream")(b"3", timeout=10))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no ALLOW rule" in info.value.details()
    assert inventory.metric("opus_authz_denied_total", rule="(no allow rule)") == before + 1


def test_permissive_mode_names_plaintext_callers(mesh: Mesh) -> None:
    rules = [
        {
            "name": "no-plain-writes",
            "action": "DENY",
            "from": [{"unauthenticated": True}],
            "to": [{"methods": ["POST", "PUT", "DELETE"]}],
        },
        {
            "name": "plain-public",
            "from": [{"unauthenticated": True}],
            "to": [{"paths": ["/public/*"]}],
        },
        {"name": "payment", "from": [{"services": ["payment"]}]},
    ]
    tls = _tls(mesh, "permissive")
    app, inventory = mesh.service("inventory", {"tls": tls, "authorization": {"rules": rules}})
    _, payment = mesh.service("payment", {"tls": tls})
    mesh.wait_endpoints(payment, "inventory", 1)
    with httpx.Client(timeout=10) as plain:  # straight to the inbound port, no certificate
        assert plain.get(f"{inventory.inbound}/public/x").status_code == 200
        before = _calls(app)
        denied = plain.get(f"{inventory.inbound}/echo")
        assert denied.status_code == 403 and "no ALLOW rule" in denied.json()["error"]
        write = plain.post(f"{inventory.inbound}/public/x", content=b"x")
        assert write.status_code == 403
        assert "'no-plain-writes'" in write.json()["error"]
        # A header claiming an identity is no identity: only the handshake's counts.
        forged = {"x-forwarded-client-cert": f"By=x;URI=spiffe://{TD}/svc/payment"}
        assert plain.get(f"{inventory.inbound}/echo", headers=forged).status_code == 403
    with httpx.Client(http1=False, http2=True, timeout=10) as h2c:  # h2c prior knowledge
        assert h2c.get(f"{inventory.inbound}/public/y").status_code == 200
        denied = h2c.get(f"{inventory.inbound}/echo")
        assert denied.status_code == 403 and denied.http_version == "HTTP/2"
    assert _calls(app) == before + 1  # the h2c caller's /public/y only
    # An mTLS caller the rules name is served on the same port, writes included.
    reply = httpx.post(f"{payment.outbound}/v1/invoke/inventory/echo", content=b"x", timeout=10)
    assert reply.status_code == 200, reply.text


def test_a_reload_changes_the_rules_on_the_next_call(mesh: Mesh) -> None:
    tls = _tls(mesh)
    deny = [{"name": "no-payment", "action": "DENY", "from": [{"services": ["payment"]}]}]
    _, inventory = mesh.service("inventory", {"tls": tls})
    _, payment = mesh.service("payment", {"tls": tls})
    mesh.wait_endpoints(payment, "inventory", 1)
    url = f"{payment.outbound}/v1/invoke/inventory/echo"
    with httpx.Client(timeout=10) as client:
        assert client.get(url).status_code == 200
        path = Path(inventory.log_path.parent / f"{inventory.name}.yaml")
        cfg = yaml.safe_load(path.read_text())
        cfg["authorization"] = {"rules": deny}
        path.write_text(yaml.safe_dump(cfg))
        reload = httpx.post(f"{inventory.admin}/config/reload", timeout=10)
        assert reload.status_code == 200, reload.text
        reply = client.get(url)
        assert reply.status_code == 403 and "'no-payment'" in reply.json()["error"]
        cfg["authorization"] = {"rules": []}
        path.write_text(yaml.safe_dump(cfg))
        assert httpx.post(f"{inventory.admin}/config/reload", timeout=10).status_code == 200
        assert client.get(url).status_code == 200
