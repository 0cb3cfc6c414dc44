"""The shared patch builder: which pods are injected, and that the result is a valid Pod.

Pods here are shaped as the API server sends them to a mutating webhook: defaulted,
with generateName and no name (a ReplicaSet's pod). Patches are applied with jsonpatch
and the result is checked against the Kubernetes 1.30 OpenAPI schema (strict: unknown
fields fail), from the schemas kubernetes-validate ships.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from sidecar.config import load_config
from sidecar.inject.patch import (
    ANN_STATUS,
    SIDECAR_NAME,
    InjectError,
    InjectOptions,
    plan,
    pointer,
)

K8S_VERSION = "1.30"


def api_server_pod(**annotations: str) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it, after the API server's defaulting."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "payment-7d9c6f5b8-",
            "namespace": "shop",
            "labels": {
                "app.kubernetes.io/name": "payment",
                "pod-template-hash": "7d9c6f5b8",
                "opus.io/inject": "true",
            },
            "annotations": dict(annotations),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "payment-7d9c6f5b8",
                    "uid": "3f1c2a9e-1b7d-4c55-9e1a-8d2f0b6c7a41",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "payment",
                    "image": "example.com/payment:1.4.2",
                    "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                    "env": [{"name": "LOG_FORMAT", "value": "json"}],
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-9xk2p",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
            ],
            "volumes": [
                {
                    "name": "kube-api-access-9xk2p",
                    "projected": {
                        "defaultMode": 420,
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "expirationSeconds": 3607,
                                    "path": "token",
                                }
                            },
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                    },
                }
            ],
        },
    }


def injected(pod: dict[str, Any], options: InjectOptions | None = None) -> dict[str, Any]:
    result = plan(pod, options)
    assert result.inject, result.reason
    out: dict[str, Any] = jsonpatch.apply_patch(pod, result.ops)
    kubernetes_validate.validate(out, K8S_VERSION, strict=True)
    return out


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_native_sidecar_is_first_init_container_with_probes_and_drain() -> None:
    pod = api_server_pod()
    out = injected(pod)
    sidecar = out["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/ready", "port": 9090}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 9090}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/health", "port": 9090}
    script = sidecar["lifecycle"]["preStop"]["exec"]["command"][2]
    assert "http://127.0.0.1:9090/drain" in script and "method='POST'" in script
    assert script.endswith("time.sleep(10)")
    compile(script, "<preStop>", "exec")  # the one-liner is valid Python
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert out["metadata"]["annotations"][ANN_STATUS] == "injected"
    assert "name" not in out["metadata"]  # generateName pods stay unnamed


def test_sidecar_env_is_accepted_by_the_sidecar_config() -> None:
    out = injected(api_server_pod(**{"opus.io/log-level": "debug"}))
    env = env_of(out["spec"]["initContainers"][0])
    assert env["OPUS_SERVICE_NAME"] == "payment"
    assert env["OPUS_APP_PORT"] == "8000"  # from the first containerPort
    assert env["OPUS_LISTENERS_OUTBOUND_HOST"] == "127.0.0.1"  # undoes the image's 0.0.0.0
    assert env["OPUS_LISTENERS_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    literals = {k: v for k, v in env.items() if isinstance(v, str)}
    cfg = load_config(None, environ=literals)
    assert (cfg.service.name, cfg.app.port, cfg.log.level) == ("payment", 8000, "DEBUG")
    assert cfg.listeners.outbound.host == "127.0.0.1"


def test_app_containers_get_the_sidecar_url_and_keep_their_env() -> None:
    out = injected(api_server_pod())
    env = env_of(out["spec"]["containers"][0])
    assert env == {"LOG_FORMAT": "json", "OPUS_SIDECAR_URL": "http://127.0.0.1:8080"}


def test_volumes_config_map_secret_and_tmp_are_added_once() -> None:
    options = InjectOptions(config_map="mesh-config", hmac_secret="mesh-keys")
    out = injected(api_server_pod(**{"opus.io/filters": "hmac"}), options)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["opus-sidecar-config"]["configMap"] == {"name": "mesh-config"}
    assert volumes["opus-hmac-keys"]["secret"] == {"secretName": "mesh-keys", "optional": True}
    assert "kube-api-access-9xk2p" in volumes
    args = out["spec"]["initContainers"][0]["args"]
    assert args == ["run", "--config", "/etc/opus/config/sidecar-hmac.yaml"]


def test_injecting_twice_changes_nothing() -> None:
    once = injected(api_server_pod())
    again = plan(once)
    assert not again.inject and again.ops == []
    assert "already injected" in again.reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["metadata"]["labels"].pop("opus.io/inject"), "not opted in"),
        (lambda p: p["metadata"]["labels"].update({"opus.io/inject": "false"}), "not opted in"),
        (lambda p: p["spec"].update({"hostNetwork": True}), "hostNetwork"),
        (lambda p: p["metadata"]["annotations"].update({ANN_STATUS: "injected"}), "already"),
        (
            lambda p: p["spec"]["containers"].append({"name": SIDECAR_NAME, "image": "x"}),
            "already has a container",
        ),
    ],
)
def test_pods_left_alone(change: Any, reason: str) -> None:
    pod = api_server_pod()
    change(pod)
    result = plan(pod)
    assert not result.inject and result.ops == []
    assert reason in result.reason


def test_label_false_wins_over_annotation_true() -> None:
    pod = api_server_pod(**{"opus.io/inject": "true"})
    pod["metadata"]["labels"]["opus.io/inject"] = "false"
    assert not plan(pod).inject


def test_annotation_alone_opts_in() -> None:
    pod = api_server_pod(**{"opus.io/inject": "true"})
    del pod["metadata"]["labels"]["opus.io/inject"]
    assert plan(pod).inject


def test_plain_container_fallback_waits_for_ready_and_keeps_default_container() -> None:
    out = injected(api_server_pod(**{"opus.io/native-sidecar": "false"}))
    assert "initContainers" not in out["spec"]
    first, app = out["spec"]["containers"]
    assert first["name"] == SIDECAR_NAME and "restartPolicy" not in first
    wait = first["lifecycle"]["postStart"]["exec"]["command"][2]
    assert "http://127.0.0.1:9090/ready" in wait
    compile(wait, "<postStart>", "exec")
    assert app["name"] == "payment"
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "payment"


def test_explicit_proxy_sets_proxy_env() -> None:
    out = injected(api_server_pod(**{"opus.io/mode": "explicit-proxy"}))
    env = env_of(out["spec"]["containers"][0])
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:8080"
    assert "127.0.0.1" in env["NO_PROXY"].split(",")


def test_transparent_mode_captures_before_the_sidecar_starts() -> None:
    pod = api_server_pod(**{"opus.io/mode": "transparent"})
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "example.com/migrate:1"}]
    out = injected(pod)
    names = [c["name"] for c in out["spec"]["initContainers"]]
    assert names == ["opus-init", SIDECAR_NAME, "migrate"]
    init = out["spec"]["initContainers"][0]
    assert init["args"] == ["iptables", "--apply", "--proxy-uid", "1337"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    sidecar = out["spec"]["initContainers"][1]
    assert sidecar["securityContext"]["runAsUser"] == 1337
    env = {k: v for k, v in env_of(sidecar).items() if isinstance(v, str)}
    assert env["OPUS_LISTENERS_CAPTURE_ENABLED"] == "true"
    assert load_config(None, environ=env).listeners.capture.enabled is True


def test_pod_with_no_annotations_env_or_volumes() -> None:
    pod = api_server_pod()
    del pod["metadata"]["annotations"]
    del pod["spec"]["volumes"]
    del pod["spec"]["containers"][0]["env"]
    out = injected(pod)
    assert out["metadata"]["annotations"] == {ANN_STATUS: "injected"}
    assert out["spec"]["volumes"][0]["name"] == "opus-sidecar-config"


@pytest.mark.parametrize(
    ("annotation", "value", "named"),
    [
        ("opus.io/app-port", "http", "opus.io/app-port"),
        ("opus.io/app-port", "70000", "opus.io/app-port"),
        ("opus.io/log-level", "LOUD", "opus.io/log-level"),
        ("opus.io/app-protocol", "grpc-web", "opus.io/app-protocol"),
        ("opus.io/discovery", "zookeeper", "opus.io/discovery"),
        ("opus.io/mode", "sideways", "opus.io/mode"),
        ("opus.io/service", "Payment_Svc", "opus.io/service"),
        ("opus.io/drain-timeout", "soon", "opus.io/drain-timeout"),
    ],
)
def test_bad_annotations_are_refused_naming_the_annotation(
    annotation: str, value: str, named: str
) -> None:
    with pytest.raises(InjectError, match=named):
        plan(api_server_pod(**{annotation: value}))


def test_warns_when_grace_period_is_shorter_than_the_drain() -> None:
    pod = api_server_pod(**{"opus.io/drain-timeout": "20"})
    result = plan(pod)
    assert any("terminationGracePeriodSeconds 30" in w for w in result.warnings)
    script = injected(copy.deepcopy(pod))["spec"]["initContainers"][0]["lifecycle"]
    assert script["preStop"]["exec"]["command"][2].endswith("time.sleep(20)")


def test_pointer_escapes() -> None:
    assert pointer("metadata", "annotations", "opus.io/status") == (
        "/metadata/annotations/opus.io~1status"
    )
    assert pointer("a~b", 0) == "/a~0b/0"
