"""The one patch builder behind both injection paths: who gets a sidecar, and what it adds.

`plan(template, options)` reads a pod (or a workload's pod template: the same
`metadata` + `spec` shape), decides whether it is injected, and returns RFC 6902
JSON Patch operations relative to that object. The webhook sends them to the API
server; `opus-sidecar inject` prefixes them with the template's path in the workload
and applies them locally. Nothing here does I/O.

The namespace gate (`opus-injection=enabled`) is not checked here: an AdmissionReview
carries no namespace labels, so the MutatingWebhookConfiguration's namespaceSelector
is what keeps other namespaces from ever reaching the webhook.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar import __version__
from sidecar.config import ConfigError, load_config

SIDECAR_NAME = "opus-sidecar"
INIT_NAME = "opus-init"
CONFIG_VOLUME = "opus-sidecar-config"
HMAC_VOLUME = "opus-hmac-keys"
TMP_VOLUME = "opus-sidecar-tmp"
CONFIG_DIR = "/etc/opus/config"
HMAC_DIR = "/etc/opus/hmac"

OUTBOUND_PORT = 8080
INBOUND_PORT = 15006
ADMIN_PORT = 9090
SIDECAR_URL = f"http://127.0.0.1:{OUTBOUND_PORT}"
# The sidecar's uid (the image's USER): transparent mode's iptables rules exempt it.
PROXY_UID = 1337

PREFIX = "opus.io/"
ANN_INJECT = PREFIX + "inject"  # "true" opts in (label or annotation; the label wins)
ANN_STATUS = PREFIX + "status"  # "injected" once done
ANN_NATIVE = PREFIX + "native-sidecar"  # "false": a plain container instead
ANN_MODE = PREFIX + "mode"  # direct | explicit-proxy | transparent
ANN_SERVICE = PREFIX + "service"
ANN_APP_PORT = PREFIX + "app-port"
ANN_APP_PROTOCOL = PREFIX + "app-protocol"
ANN_DISCOVERY = PREFIX + "discovery"
ANN_LOG_LEVEL = PREFIX + "log-level"
ANN_FILTERS = PREFIX + "filters"  # profile: selects sidecar-<profile>.yaml in the ConfigMap
ANN_DRAIN_TIMEOUT = PREFIX + "drain-timeout"
ANN_HMAC_SECRET = PREFIX + "hmac-secret"
DEFAULT_CONTAINER_ANN = "kubectl.kubernetes.io/default-container"

MODES = ("direct", "explicit-proxy", "transparent")
_PROFILE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NO_PROXY = "127.0.0.1,localhost,::1,kubernetes.default.svc"

JsonPatch = list[dict[str, Any]]


class InjectError(ValueError):
    """An opted-in pod asks for something the injector cannot honour; the message says what."""


@dataclass(frozen=True, slots=True)
class InjectOptions:
    """Cluster-wide injection settings (the injector's flags); annotations override per pod."""

    image: str = f"opus-mesh/opus-sidecar:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    config_map: str = "opus-sidecar-config"
    hmac_secret: str = "opus-hmac-keys"
    drain_timeout: float = 10.0
    requests: dict[str, str] = field(default_factory=lambda: {"cpu": "100m", "memory": "64Mi"})
    limits: dict[str, str] = field(default_factory=lambda: {"cpu": "1", "memory": "256Mi"})
    native_sidecar: bool = True
    # Offline only: inject every pod template that does not say opus.io/inject: "false".
    force: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one pod: `ops` is empty when it is skipped (`reason` says why)."""

    inject: bool
    reason: str
    ops: JsonPatch = field(default_factory=list)
    warnings: tuple[str, ...] = ()


def pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON pointer from raw path parts ('opus.io/status' -> 'opus.io~1status')."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


# --- Policy ---------------------------------------------------------------------


def _opt_in(metadata: Mapping[str, Any], force: bool) -> str | None:
    """'true'/'false' from the label (wins) or annotation; None when neither says."""
    for where in ("labels", "annotations"):
        value = (metadata.get(where) or {}).get(ANN_INJECT)
        if value is not None:
            return str(value).strip().lower()
    return "true" if force else None


def _containers(spec: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key) or []
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise InjectError(f"spec.{key} must be a list of containers")
    return value


def decide(template: Mapping[str, Any], force: bool = False) -> tuple[bool, str]:
    """Whether to inject, and why (the reason is logged and returned as a warning)."""
    metadata = template.get("metadata") or {}
    spec = template.get("spec") or {}
    choice = _opt_in(metadata, force)
    if choice != "true":
        return False, f"not opted in ({ANN_INJECT} is {choice or 'unset'})"
    if spec.get("hostNetwork"):
        return False, "hostNetwork pods share the node's ports and are never injected"
    annotations = metadata.get("annotations") or {}
    if annotations.get(ANN_STATUS) == "injected":
        return False, f"already injected ({ANN_STATUS}: injected)"
    names = {
        c.get("name") for key in ("containers", "initContainers") for c in _containers(spec, key)
    }
    if SIDECAR_NAME in names:
        return False, f"already has a container named {SIDECAR_NAME}"
    if not _containers(spec, "containers"):
        return False, "the pod has no containers"
    return True, "opted in"


# --- Per-pod settings from annotations ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PodSettings:
    mode: str
    native: bool
    profile: str
    hmac_secret: str
    drain_timeout: float
    env: dict[str, str]  # OPUS_* literals for the sidecar
    warnings: tuple[str, ...]


def _service_name(metadata: Mapping[str, Any]) -> str:
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    for value in (
        annotations.get(ANN_SERVICE),
        labels.get("app.kubernetes.io/name"),
        labels.get("app"),
    ):
        if value:
            return str(value)
    return ""


def _first_port(containers: list[dict[str, Any]]) -> int | None:
    for container in containers:
        for port in container.get("ports") or []:
            if isinstance(port, dict) and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def _settings(template: Mapping[str, Any], options: InjectOptions) -> _PodSettings:
    metadata = template.get("metadata") or {}
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    spec = template.get("spec") or {}
    warnings: list[str] = []

    mode = str(annotations.get(ANN_MODE, "direct"))
    if mode not in MODES:
        raise InjectError(f"annotation {ANN_MODE} must be one of {', '.join(MODES)}, got {mode!r}")
    native_text = str(annotations.get(ANN_NATIVE, str(options.native_sidecar))).lower()
    if native_text not in ("true", "false"):
        raise InjectError(f"annotation {ANN_NATIVE} must be 'true' or 'false', got {native_text!r}")
    profile = str(annotations.get(ANN_FILTERS, ""))
    if profile and not _PROFILE.fullmatch(profile):
        raise InjectError(f"annotation {ANN_FILTERS} must be a profile name like 'hmac'")
    drain = options.drain_timeout
    if ANN_DRAIN_TIMEOUT in annotations:
        try:
            drain = float(annotations[ANN_DRAIN_TIMEOUT])
        except ValueError:
            drain = -1.0
        if not 0 <= drain <= 3600:
            raise InjectError(f"annotation {ANN_DRAIN_TIMEOUT} must be seconds in 0..3600")

    env: dict[str, str] = {"OPUS_DRAIN_TIMEOUT": _seconds(drain)}
    service = _service_name(metadata)
    if service:
        env["OPUS_SERVICE_NAME"] = service
    else:
        warnings.append(
            f"no service name: set annotation {ANN_SERVICE} or label app.kubernetes.io/name; "
            "the sidecar uses its config's service.name"
        )
    app_port = annotations.get(ANN_APP_PORT)
    if app_port is None:
        found = _first_port(_containers(spec, "containers"))
        app_port = None if found is None else str(found)
    if app_port is not None:
        env["OPUS_APP_PORT"] = str(app_port)
    else:
        warnings.append(f"no app port: set annotation {ANN_APP_PORT} or a containerPort")
    for annotation, var in (
        (ANN_APP_PROTOCOL, "OPUS_APP_PROTOCOL"),
        (ANN_DISCOVERY, "OPUS_DISCOVERY_BACKEND"),
        (ANN_LOG_LEVEL, "OPUS_LOG_LEVEL"),
    ):
        if annotation in annotations:
            env[var] = str(annotations[annotation])
    if mode == "transparent":
        env["OPUS_LISTENERS_CAPTURE_ENABLED"] = "true"  # where the iptables rules redirect to
    _check_with_sidecar_schema(env)

    grace = spec.get("terminationGracePeriodSeconds", 30)
    if isinstance(grace, int) and grace < 2 * drain + 5:
        warnings.append(
            f"terminationGracePeriodSeconds {grace} is shorter than the drain needs "
            f"({_seconds(2 * drain + 5)}: preStop sleep + drain_timeout + 5)"
        )
    return _PodSettings(
        mode=mode,
        native=native_text == "true",
        profile=profile,
        hmac_secret=str(annotations.get(ANN_HMAC_SECRET, options.hmac_secret)),
        drain_timeout=drain,
        env=env,
        warnings=tuple(warnings),
    )


def _check_with_sidecar_schema(env: dict[str, str]) -> None:
    """Refuse now what the sidecar would refuse at start, with its own message."""
    try:
        load_config(None, environ=env)
    except ConfigError as exc:
        annotation = {
            "OPUS_SERVICE_NAME": ANN_SERVICE,
            "OPUS_APP_PORT": ANN_APP_PORT,
            "OPUS_APP_PROTOCOL": ANN_APP_PROTOCOL,
            "OPUS_DISCOVERY_BACKEND": ANN_DISCOVERY,
            "OPUS_LOG_LEVEL": ANN_LOG_LEVEL,
        }.get(exc.env_var, exc.env_var)
        raise InjectError(f"{annotation}: {exc.message}") from None


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --- What gets added ------------------------------------------------------------------


def _env_list(literals: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in literals.items()]


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": ADMIN_PORT},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    }


_DRAIN_SCRIPT = (
    "import time,urllib.request as u\n"
    "try:u.urlopen(u.Request('http://127.0.0.1:{port}/drain',method='POST'),timeout=2)\n"
    "except Exception:pass\n"
    "time.sleep({seconds})"
)
_WAIT_READY_SCRIPT = (
    "import time,urllib.request as u\n"
    "for _ in range({tries}):\n"
    " try:\n"
    "  u.urlopen('http://127.0.0.1:{port}/ready',timeout=1);break\n"
    " except Exception:time.sleep(0.5)"
)


def sidecar_container(settings: _PodSettings, options: InjectOptions) -> dict[str, Any]:
    config_file = f"sidecar-{settings.profile}.yaml" if settings.profile else "sidecar.yaml"
    env = [
        *_env_list(settings.env),
        # The image binds outbound on 0.0.0.0 for `docker run -p`; in a pod the app
        # shares the network namespace, and the pod IP must not reach this listener.
        {"name": "OPUS_LISTENERS_OUTBOUND_HOST", "value": "127.0.0.1"},
        _field_env("OPUS_SERVICE_INSTANCE_ID", "metadata.name"),
        _field_env("OPUS_LISTENERS_ADVERTISE_HOST", "status.podIP"),
        # For discovery backend "kubernetes", without relying on a mounted token's file.
        _field_env("OPUS_DISCOVERY_KUBERNETES_NAMESPACE", "metadata.namespace"),
    ]
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["opus-sidecar"],
        "args": ["run", "--config", f"{CONFIG_DIR}/{config_file}"],
        "ports": [
            {"name": "opus-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "opus-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "resources": {"requests": dict(options.requests), "limits": dict(options.limits)},
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        # Startup on /ready: a native sidecar holds the app containers until it passes.
        "startupProbe": _http_probe("/ready", period=1, failures=120),
        "readinessProbe": _http_probe("/ready", period=5, failures=2),
        "livenessProbe": _http_probe("/health", period=10, failures=3),
        "lifecycle": {
            "preStop": {
                "exec": {
                    "command": [
                        "python",
                        "-c",
                        _DRAIN_SCRIPT.format(
                            port=ADMIN_PORT, seconds=_seconds(settings.drain_timeout)
                        ),
                    ]
                }
            }
        },
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": HMAC_VOLUME, "mountPath": HMAC_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }
    if settings.native:
        container["restartPolicy"] = "Always"
    else:
        # Plain containers start in order and kubelet waits for each postStart:
        # the app containers after this one start once the sidecar is ready.
        container["lifecycle"]["postStart"] = {
            "exec": {
                "command": ["python", "-c", _WAIT_READY_SCRIPT.format(tries=240, port=ADMIN_PORT)]
            }
        }
    return container


def init_container(options: InjectOptions) -> dict[str, Any]:
    """Transparent mode's traffic capture; `opus-sidecar iptables` is its own issue's command."""
    return {
        "name": INIT_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["opus-sidecar"],
        # Its port defaults are this module's (outbound 8080, inbound 15006, admin 9090
        # left alone); the uid is spelled out because the sidecar container sets it.
        "args": ["iptables", "--apply", "--proxy-uid", str(PROXY_UID)],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _volumes(settings: _PodSettings, options: InjectOptions) -> list[dict[str, Any]]:
    return [
        {"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}},
        # optional: a pod without HMAC filters need not have the Secret.
        {"name": HMAC_VOLUME, "secret": {"secretName": settings.hmac_secret, "optional": True}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}},
    ]


def _app_env(mode: str) -> dict[str, str]:
    env = {"OPUS_SIDECAR_URL": SIDECAR_URL}
    if mode == "explicit-proxy":
        # Both spellings: curl reads only the lower-case http_proxy, Go and others both.
        for name in ("HTTP_PROXY", "http_proxy"):
            env[name] = SIDECAR_URL
        for name in ("NO_PROXY", "no_proxy"):
            env[name] = _NO_PROXY
    return env


# --- The patch ------------------------------------------------------------------------


def _append_ops(base: str, existing: object, items: list[dict[str, Any]]) -> JsonPatch:
    """Add items to a list that may not exist yet (JSON Patch cannot append to nothing)."""
    if not items:
        return []
    if not existing:
        return [{"op": "add", "path": base, "value": items}]
    return [{"op": "add", "path": f"{base}/-", "value": item} for item in items]


def plan(template: Mapping[str, Any], options: InjectOptions | None = None) -> Plan:
    """Decide, and build the JSON Patch (paths relative to `template`) when injecting.

    Raises InjectError when an opted-in pod's annotations are invalid.
    """
    options = options or InjectOptions()
    if not isinstance(template.get("metadata") or {}, Mapping) or not isinstance(
        template.get("spec"), Mapping
    ):
        return Plan(False, "not a pod: no spec mapping")
    inject, reason = decide(template, options.force)
    if not inject:
        return Plan(False, reason)
    settings = _settings(template, options)
    metadata: Mapping[str, Any] = template.get("metadata") or {}
    spec: Mapping[str, Any] = template["spec"]
    containers = _containers(spec, "containers")
    inits = _containers(spec, "initContainers")
    ops: JsonPatch = []

    annotations = {ANN_STATUS: "injected"}
    if not settings.native and DEFAULT_CONTAINER_ANN not in (metadata.get("annotations") or {}):
        # The sidecar goes first; keep `kubectl logs/exec` pointed at the app.
        annotations[DEFAULT_CONTAINER_ANN] = str(containers[0].get("name", ""))
    if metadata.get("annotations"):
        ops += [
            {"op": "add", "path": pointer("metadata", "annotations", k), "value": v}
            for k, v in annotations.items()
        ]
    elif "metadata" in template:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
    else:
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": annotations}})

    app_env = _app_env(settings.mode)
    for i, container in enumerate(containers):
        present = {e.get("name") for e in container.get("env") or []}
        missing = [{"name": k, "value": v} for k, v in app_env.items() if k not in present]
        ops += _append_ops(pointer("spec", "containers", i, "env"), container.get("env"), missing)

    sidecar = sidecar_container(settings, options)
    front: list[dict[str, Any]] = []
    if settings.mode == "transparent":
        front.append(init_container(options))
    if settings.native:
        front.append(sidecar)
    else:
        ops.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})
    if front and not inits:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": front})
    else:
        # Inserted at the front, in reverse, so they end up first and in order:
        # capture, then the sidecar, then the app's own init containers (which
        # can then use the mesh).
        ops += [
            {"op": "add", "path": "/spec/initContainers/0", "value": c} for c in reversed(front)
        ]

    have = {v.get("name") for v in spec.get("volumes") or []}
    new_volumes = [v for v in _volumes(settings, options) if v["name"] not in have]
    ops += _append_ops("/spec/volumes", spec.get("volumes"), new_volumes)
    return Plan(True, reason, ops, settings.warnings)


def prefixed(ops: JsonPatch, prefix: str) -> JsonPatch:
    """The same ops, relative to the document that holds the template at `prefix`."""
    return [{**op, "path": prefix + op["path"]} for op in ops]
