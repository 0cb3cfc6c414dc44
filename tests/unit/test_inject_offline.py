"""`opus-sidecar inject` on multi-document YAML, and the webhook's review() without sockets."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from sidecar import cli
from sidecar.inject.offline import OfflineError, inject_yaml
from sidecar.inject.patch import SIDECAR_NAME, InjectOptions
from sidecar.inject.webhook import review
from tests.unit.test_inject_patch import api_server_pod

K8S_VERSION = "1.30"


def _template(name: str, opted: bool = True) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    if opted:
        labels["opus.io/inject"] = "true"
    return {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": name, "image": f"example.com/{name}:1"}]},
    }


def _workloads() -> list[dict[str, Any]]:
    selector = {"matchLabels": {"app.kubernetes.io/name": "x"}}
    job_template = _template("batch")
    job_template["spec"]["restartPolicy"] = "Never"
    pod = {"apiVersion": "v1", "kind": "Pod", **_template("solo")}
    pod["metadata"]["name"] = "solo"
    return [
        pod,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "payment"},
            "spec": {"selector": selector, "template": _template("payment")},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "ledger"},
            "spec": {
                "selector": selector,
                "serviceName": "ledger",
                "template": _template("ledger"),
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent"},
            "spec": {"selector": selector, "template": _template("agent")},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "migrate"},
            "spec": {"template": job_template},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "nightly"},
            "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": job_template}}},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "legacy"},
            "spec": {"selector": selector, "template": _template("legacy", opted=False)},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "payment"},
            "spec": {"ports": [{"port": 80}], "selector": {"app.kubernetes.io/name": "payment"}},
        },
    ]


TEMPLATE_AT = {
    "Pod": lambda d: d,
    "Deployment": lambda d: d["spec"]["template"],
    "StatefulSet": lambda d: d["spec"]["template"],
    "DaemonSet": lambda d: d["spec"]["template"],
    "Job": lambda d: d["spec"]["template"],
    "CronJob": lambda d: d["spec"]["jobTemplate"]["spec"]["template"],
}


def _names(template: dict[str, Any]) -> list[str]:
    spec = template["spec"]
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]


def test_every_workload_kind_is_injected_and_valid() -> None:
    source = _workloads()
    text, outcomes = inject_yaml(yaml.safe_dump_all(source, sort_keys=False), InjectOptions())
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == len(source)
    for before, after in zip(source, docs, strict=True):
        kubernetes_validate.validate(after, K8S_VERSION, strict=True)
        name = after["metadata"]["name"]
        if after["kind"] == "Service" or name == "legacy":
            assert after == before, f"{after['kind']}/{name} must pass through unchanged"
        else:
            assert SIDECAR_NAME in _names(TEMPLATE_AT[after["kind"]](after)), name
    assert [o.injected for o in outcomes] == [True] * 6 + [False]
    assert outcomes[-1].name == "Deployment/legacy" and "not opted in" in outcomes[-1].reason


def test_inject_is_idempotent() -> None:
    once, _ = inject_yaml(yaml.safe_dump_all(_workloads(), sort_keys=False), InjectOptions())
    twice, outcomes = inject_yaml(once, InjectOptions())
    assert twice == once
    assert not any(o.injected for o in outcomes)


def test_force_injects_unlabelled_but_not_opted_out() -> None:
    docs = [_workloads()[6]]  # "legacy", no opus.io/inject
    text, _ = inject_yaml(yaml.safe_dump_all(docs), InjectOptions(force=True))
    assert SIDECAR_NAME in _names(next(yaml.safe_load_all(text))["spec"]["template"])
    docs[0]["spec"]["template"]["metadata"]["labels"]["opus.io/inject"] = "false"
    text, outcomes = inject_yaml(yaml.safe_dump_all(docs), InjectOptions(force=True))
    assert not outcomes[0].injected


def test_list_kind_items_are_injected() -> None:
    items = _workloads()[:2]
    text, outcomes = inject_yaml(
        yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}), InjectOptions()
    )
    out = yaml.safe_load(text)
    assert SIDECAR_NAME in _names(out["items"][1]["spec"]["template"])
    assert len(outcomes) == 2


def test_bad_annotation_names_the_document() -> None:
    doc = _workloads()[1]
    doc["spec"]["template"]["metadata"]["annotations"] = {"opus.io/app-port": "http"}
    with pytest.raises(OfflineError, match=r"document 1 \(Deployment/payment\): opus.io/app-port"):
        inject_yaml(yaml.safe_dump(doc), InjectOptions())


def test_cli_prints_yaml_to_stdout_and_reports_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump_all(_workloads()[1:3], sort_keys=False))
    assert cli.main(["inject", "-f", str(path), "--sidecar-image", "reg.example/opus:9"]) == 0
    out, err = capsys.readouterr()
    docs = list(yaml.safe_load_all(out))
    sidecar = docs[0]["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["image"] == "reg.example/opus:9"
    assert "document 1 Deployment/payment: injected" in err


def test_cli_bad_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: [unclosed")
    assert cli.main(["inject", "-f", str(path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


# --- review(): the webhook's protocol without sockets ---------------------------------


def admission_review(pod: dict[str, Any], **request: Any) -> bytes:
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "8b1c3f0e-2d4a-4f5b-9c6d-7e8f9a0b1c2d",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            **request,
        },
    }
    return json.dumps(body).encode()


def test_review_returns_base64_json_patch_echoing_uid() -> None:
    pod = api_server_pod()
    status, reply = review(admission_review(pod), InjectOptions())
    assert status == 200
    assert reply["apiVersion"] == "admission.k8s.io/v1" and reply["kind"] == "AdmissionReview"
    response = reply["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    kubernetes_validate.validate(patched, K8S_VERSION, strict=True)


def test_review_of_pod_not_opted_in_allows_without_patch() -> None:
    pod = api_server_pod()
    pod["metadata"]["labels"].pop("opus.io/inject")
    status, reply = review(admission_review(pod), InjectOptions())
    assert status == 200 and reply["response"] == {"uid": reply["response"]["uid"], "allowed": True}


def test_review_refuses_bad_annotation_with_its_name() -> None:
    status, reply = review(
        admission_review(api_server_pod(**{"opus.io/log-level": "LOUD"})), InjectOptions()
    )
    assert status == 200
    assert reply["response"]["allowed"] is False
    assert reply["response"]["status"]["code"] == 400
    assert "opus.io/log-level" in reply["response"]["status"]["message"]


def test_review_of_other_kinds_and_operations_allows_with_a_warning() -> None:
    status, reply = review(admission_review(api_server_pod(), operation="UPDATE"), InjectOptions())
    assert status == 200 and reply["response"]["allowed"] is True
    assert "only Pod CREATE" in reply["response"]["warnings"][0]
    assert "patch" not in reply["response"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}', "v1"),
        (b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}', "no request"),
        (b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}', "no uid"),
    ],
)
def test_malformed_reviews_get_400_with_a_message(body: bytes, message: str) -> None:
    status, reply = review(body, InjectOptions())
    assert status == 400
    assert message in reply["error"]


def test_review_with_a_broken_pod_object_never_raises() -> None:
    pod = api_server_pod()
    pod["spec"]["containers"] = "not a list"
    status, reply = review(admission_review(pod), InjectOptions())
    assert status == 200 and reply["response"]["allowed"] is False
    assert "spec.containers must be a list" in reply["response"]["status"]["message"]
