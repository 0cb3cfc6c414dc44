"""Route rules through real sidecars on a file registry: a weighted split between two
subsets of a service (instances told apart by their registered metadata), 503 naming
an empty subset, the rule's name in the access log, per-route policy, injected faults
over HTTP/1.1, h2c and gRPC, and a mirror that hangs or fails without touching the
real calls."""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.conftest import Mesh, Sidecar


def inventory_pair(mesh: Mesh) -> None:
    """Two inventory instances, v1 and v2, each with its sidecar (their `service.meta`
    is what they register)."""
    for version in ("v1", "v2"):
        app = mesh.app(f"inventory-{version}")
        mesh.sidecar("inventory", app.ports["port"], {"service": {"meta": {"version": version}}})


def caller(mesh: Mesh, services: dict[str, Any], extra: dict[str, Any] | None = None) -> Sidecar:
    app = mesh.app("payment")
    config: dict[str, Any] = {"services": services, **(extra or {})}
    return mesh.sidecar("payment", app.ports["port"], config)


CANARY = {
    "inventory": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}, "v3": {"version": "v3"}},
        "route_rules": [
            {
                "name": "nowhere",
                "match": {"headers": [{"name": "x-v3", "present": True}]},
                "destinations": [{"subset": "v3"}],
            },
            {
                "name": "canary",
                "match": {"path": {"prefix": "/echo"}},
                "destinations": [
                    {"subset": "v1", "weight": 90},
                    {"subset": "v2", "weight": 10},
                ],
            },
        ],
    }
}


def test_a_90_10_split_between_subsets(mesh: Mesh) -> None:
    inventory_pair(mesh)
    payment = caller(mesh, CANARY)
    mesh.wait_endpoints(payment, "inventory", 2)
    apps: dict[str, int] = {}
    with httpx.Client(base_url=payment.outbound, timeout=10) as client:
        for _ in range(400):
            response = client.get("/v1/invoke/inventory/echo")
            assert response.status_code == 200
            apps[response.headers["x-app"]] = apps.get(response.headers["x-app"], 0) + 1
    assert abs(apps.get("inventory-v2", 0) / 4 - 10) <= 1.5, apps
    assert apps["inventory-v1"] + apps["inventory-v2"] == 400
    records = payment.access_log(401)
    assert {r["route"] for r in records[-400:]} == {"canary"}
    assert payment.metric("opus_route_requests_total", route="canary", subset="v2") == apps[
        "inventory-v2"
    ]


def test_an_empty_subset_is_a_503_naming_it(mesh: Mesh) -> None:
    inventory_pair(mesh)
    payment = caller(mesh, CANARY)
    mesh.wait_endpoints(payment, "inventory", 2)
    response = httpx.get(
        f"{payment.outbound}/v1/invoke/inventory/echo", headers={"x-v3": "1"}, timeout=10
    )
    assert response.status_code == 503
    assert "subset 'v3' of service 'inventory'" in response.text
    assert response.headers["x-opus-error"] == "UH"
