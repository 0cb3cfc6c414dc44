"""The deploy artifacts: Kubernetes manifests, the Dockerfile, the wheel, the compose mesh.

No Docker engine or Kubernetes cluster runs here, so each artifact is checked as far as
it can be without one: manifests against the Kubernetes 1.30 OpenAPI schema (strict),
the Dockerfile by parsing it and running its command with its ENV, the wheel by building
it from exactly what the Dockerfile copies, the compose file with `docker-compose config`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from sidecar.cli import _parser
from sidecar.config import load_config
from sidecar.inject import cert
from sidecar.inject.offline import inject_yaml
from sidecar.inject.patch import InjectOptions
from sidecar.inject.webhook import INJECT_PATHS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose"
K8S_VERSION = "1.30"
# CRDs the core schema cannot know; checked by hand below.
CRD_GROUPS = ("cert-manager.io/",)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.relative_to(REPO)}:{d['kind']}/{d['metadata']['name']}", d)
        for p in sorted(K8S.rglob("*.yaml"))
        for d in _docs(p)
    ]


def _find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = (d for _, d in _all_manifests() if d["kind"] == kind and d["metadata"]["name"] == name)
    return doc


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "doc"), _all_manifests(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_manifest_validates_against_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith(CRD_GROUPS):
        pytest.skip(f"{doc['apiVersion']} is a CRD; checked in test_cert_manager_certificate")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_webhook_configuration_gates_and_points_at_the_injector() -> None:
    config = _find("MutatingWebhookConfiguration", "opus-sidecar-injector")
    (hook,) = config["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail"
    assert hook["namespaceSelector"] == {"matchLabels": {"opus-injection": "enabled"}}
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == [
        "pods"
    ]
    service = hook["clientConfig"]["service"]
    assert service["path"] in INJECT_PATHS
    svc = _find("Service", service["name"])
    assert svc["metadata"]["namespace"] == service["namespace"]
    assert service["port"] in [p["port"] for p in svc["spec"]["ports"]]
    assert not _find("Namespace", "opus-system")["metadata"].get("labels", {}).get("opus-injection")


def _cli_args(container: dict[str, Any]) -> Any:
    return _parser().parse_args(container.get("args", []))


def test_injector_deployment_args_are_accepted_by_the_cli() -> None:
    deployment = _find("Deployment", "opus-sidecar-injector")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = _cli_args(container)
    assert args.command == "injector"
    assert args.port == container["ports"][0]["containerPort"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert str(args.cert).startswith(mount) and str(args.key).startswith(mount)
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_cert_manager_certificate_covers_the_service_and_feeds_the_deployment() -> None:
    certificate = _find("Certificate", "opus-sidecar-injector")
    assert certificate["spec"]["dnsNames"] == cert.service_dns_names(
        "opus-sidecar-injector", "opus-system"
    )
    deployment = _find("Deployment", "opus-sidecar-injector")
    volume = deployment["spec"]["template"]["spec"]["volumes"][0]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    webhook = _find("MutatingWebhookConfiguration", "opus-sidecar-injector")
    ns, name = webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert (ns, name) == (certificate["metadata"]["namespace"], certificate["metadata"]["name"])


def test_self_signed_job_uses_the_cli_and_may_patch_only_the_webhook() -> None:
    job = _find("Job", "opus-injector-certgen")
    gen = job["spec"]["template"]["spec"]["initContainers"][0]
    args = _cli_args(gen)
    assert args.command == "injector" and args.gen_certs == Path("/certs")
    role = _find("ClusterRole", "opus-injector-certgen")
    (rule,) = role["rules"]
    assert rule["resourceNames"] == ["opus-sidecar-injector"]
    assert set(rule["verbs"]) == {"get", "patch"}


def _injected_example() -> list[dict[str, Any]]:
    text = "\n---\n".join(p.read_text() for p in sorted((K8S / "example").glob("*.yaml")))
    out, outcomes = inject_yaml(text, InjectOptions())
    assert sum(o.injected for o in outcomes) == 2  # payment and inventory
    return [d for d in yaml.safe_load_all(out) if d]


def test_example_app_injected_offline_validates() -> None:
    for doc in _injected_example():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            assert spec["initContainers"][0]["name"] == "opus-sidecar"
            assert doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_sidecar_config_map_profiles_load_with_the_injected_env(tmp_path: Path) -> None:
    """What a pod's sidecar would load: a ConfigMap profile plus the injector's env."""
    secret = _find("Secret", "opus-hmac-keys")
    keys = tmp_path / "hmac"
    keys.mkdir()
    for key_id, value in secret["stringData"].items():
        (keys / key_id).write_text(value)
    config_map = _find("ConfigMap", "opus-sidecar-config")
    payment = next(
        d
        for d in _injected_example()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "payment"
    )
    sidecar = payment["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    profile = Path(sidecar["args"][-1]).name
    assert profile in config_map["data"]
    for name, text in config_map["data"].items():
        path = tmp_path / name
        path.write_text(text.replace("/etc/opus/hmac", str(keys)))
        cfg = load_config(str(path), environ=env)
        assert cfg.service.name == "payment" and cfg.app.port == 8000
        assert cfg.listeners.outbound.host == "127.0.0.1"
        assert cfg.discovery.backend == "kubernetes"
        if name == profile:
            assert [f.name for f in cfg.filters.outbound] == ["hmac_sign"]


# --- Dockerfile ---------------------------------------------------------------------------


def _stages() -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for item in DockerfileParser(str(REPO / "Dockerfile")).structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages and item["instruction"] != "COMMENT":
            stages[-1].append(item)
    return stages


def _values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_dockerfile_final_stage_runs_the_sidecar_as_non_root() -> None:
    builder, final = _stages()
    assert "AS builder" in builder[0]["value"]
    (user,) = _values(final, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert _values(final, "EXPOSE") == ["8080 9090 15006"]
    (healthcheck,) = _values(final, "HEALTHCHECK")
    assert "http://127.0.0.1:9090/health" in healthcheck and "curl" not in healthcheck
    assert json.loads(_values(final, "ENTRYPOINT")[0]) == ["opus-sidecar"]
    assert json.loads(_values(final, "CMD")[0]) == ["run"]
    assert "OPUS_LISTENERS_OUTBOUND_HOST=0.0.0.0" in _values(final, "ENV")
    # The wheel is built in the builder and installed (not copied as sources) in the final.
    assert any("pip wheel" in v for v in _values(builder, "RUN"))
    assert any("from=builder" in v and "pip install" in v for v in _values(final, "RUN"))
    assert not _values(final, "COPY")


def _packages() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]


def test_builder_copies_every_package_and_dockerignore_lets_it_through() -> None:
    builder = _stages()[0]
    copied = {v.split()[0] for v in _values(builder, "COPY")} | {
        "README.md"  # COPY pyproject.toml README.md ./
    }
    assert set(_packages()) <= copied
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed
    assert (REPO / ".dockerignore").read_text().splitlines()[1] == "*"  # an allow-list


def test_wheel_built_from_the_docker_context_has_packages_and_entry_point(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    for package in _packages():
        shutil.copytree(
            REPO / package, context / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            ".",
            "-w",
            str(tmp_path / "dist"),
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("opus_mesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in _packages():
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    assert "sidecar/inject/webhook.py" in names
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[console_scripts]" in text and "opus-sidecar = sidecar.cli:main" in text


@pytest.mark.integration
def test_image_command_with_image_env_serves_health(tmp_path: Path) -> None:
    """The closest to `docker run IMAGE` here: ENTRYPOINT + CMD with the image's ENV.

    Differences, all for running beside other tests: ports 0 (read back with --ports-file)
    and a private file-registry directory.
    """
    parser = DockerfileParser(str(REPO / "Dockerfile"))
    final = _stages()[-1]
    argv = json.loads(_values(final, "ENTRYPOINT")[0]) + json.loads(_values(final, "CMD")[0])
    argv[0] = str(Path(sys.executable).with_name(argv[0]))  # the console script
    ports_file = tmp_path / "ports.json"
    env = {
        "PATH": str(Path(sys.executable).parent),
        **parser.envs,
        "OPUS_LOG_LEVEL": "DEBUG",  # as in the seed's docker run
        "OPUS_LISTENERS_OUTBOUND_PORT": "0",
        "OPUS_LISTENERS_INBOUND_PORT": "0",
        "OPUS_LISTENERS_ADMIN_PORT": "0",
        "OPUS_DISCOVERY_FILE_DIRECTORY": str(tmp_path / "registry"),
    }
    log = (tmp_path / "sidecar.log").open("wb")
    proc = subprocess.Popen(
        [*argv, "--ports-file", str(ports_file)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not ports_file.exists():
            assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
            assert time.monotonic() < deadline, "sidecar did not start"
            time.sleep(0.02)
        ports = json.loads(ports_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/health", timeout=5) as r:
            assert r.status == 200 and r.read() == b'{"status":"UP"}'
        # 0.0.0.0 answers on every local address; a 127.0.0.1 bind would refuse 127.0.0.2.
        socket.create_connection(("127.0.0.2", ports["outbound"]), timeout=5).close()
        # The image's HEALTHCHECK command itself, pointed at this admin port.
        (healthcheck,) = _values(final, "HEALTHCHECK")
        check = json.loads(healthcheck.split("CMD", 1)[1])
        check = [a.replace(":9090/", f":{ports['admin']}/") for a in check]
        check[0] = sys.executable
        assert subprocess.run(check, timeout=10).returncode == 0
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        log.close()


# --- docker-compose -----------------------------------------------------------------------


def test_compose_file_validates_with_docker_compose() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose)")
    done = subprocess.run(
        [binary, "-f", str(COMPOSE / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {
        "consul",
        "payment-sidecar",
        "payment",
        "inventory-sidecar",
        "inventory",
    }
    assert services["consul"]["image"].startswith("hashicorp/consul")
    assert "-dev" in services["consul"]["command"]
    for app in ("payment", "inventory"):
        assert services[app]["network_mode"] == f"service:{app}-sidecar"
        env = services[f"{app}-sidecar"]["environment"]
        assert env["OPUS_DISCOVERY_BACKEND"] == "consul"
        assert env["OPUS_DISCOVERY_CONSUL_ADDRESS"] == "http://consul:8500"
        assert services[f"{app}-sidecar"]["depends_on"]["consul"]["condition"] == "service_healthy"


def test_compose_sidecar_config_loads_with_compose_env(tmp_path: Path) -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    config = tmp_path / "sidecar.yaml"
    text = (COMPOSE / "config" / "sidecar.yaml").read_text()
    config.write_text(text.replace("/etc/opus/keys", str(COMPOSE / "keys")))
    for app in ("payment", "inventory"):
        env = {k: str(v) for k, v in compose["services"][f"{app}-sidecar"]["environment"].items()}
        cfg = load_config(str(config), environ={**env, "OPUS_LISTENERS_OUTBOUND_HOST": "0.0.0.0"})
        assert cfg.service.name == app
        assert cfg.discovery.backend == "consul"
        assert cfg.discovery.consul.address == "http://consul:8500"
        assert [f.name for f in cfg.filters.outbound] == ["hmac_sign"]
        assert [f.name for f in cfg.filters.inbound] == ["hmac_verify"]
