"""`opus-sidecar inject`: the webhook's patch, applied on the client to multi-document YAML.

Each document's pod template is found by kind, handed to the same `plan()` the webhook
uses, and the ops (prefixed with the template's path) are applied with `jsonpatch`.
Other documents pass through unchanged, so

    kubectl apply -f <(opus-sidecar inject -f app.yaml)

applies everything the file held. Comments do not survive the YAML round trip.
There is no namespace here, so the namespace gate does not apply: only the pod's own
opus.io/inject (or `--force`) decides.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from sidecar.inject.patch import InjectOptions, JsonPatch, plan, pointer, prefixed

# Where each workload kind keeps its pod template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class OfflineError(Exception):
    """The input cannot be read or patched; the message names the document."""


@dataclass(frozen=True, slots=True)
class Outcome:
    document: int  # 1-based, in the input
    name: str  # "Deployment/payment"
    injected: bool
    reason: str
    warnings: tuple[str, ...] = ()


def _apply(doc: dict[str, Any], ops: JsonPatch) -> dict[str, Any]:
    try:
        import jsonpatch
    except ImportError:
        raise OfflineError(
            "`inject` needs the 'jsonpatch' package: pip install 'opus-mesh[injector]'"
        ) from None
    result: dict[str, Any] = jsonpatch.apply_patch(doc, ops)
    return result


def _templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], tuple[str | int, ...]]]:
    """(kind/name, template, path to it) for every pod template in a document."""
    kind = str(doc.get("kind", ""))
    if kind == "List" and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            if isinstance(item, dict):
                for name, template, inner in _templates(item):
                    yield name, template, ("items", i, *inner)
        return
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        return
    metadata: dict[str, Any] = doc["metadata"] if isinstance(doc.get("metadata"), dict) else {}
    name = f"{kind}/{metadata.get('name') or metadata.get('generateName') or '-'}"
    node: Any = doc
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        yield name, node, path


def inject_documents(docs: list[Any], options: InjectOptions) -> tuple[list[Any], list[Outcome]]:
    """Inject every opted-in pod template; returns the new documents and what happened."""
    out: list[Any] = []
    outcomes: list[Outcome] = []
    for number, doc in enumerate(docs, start=1):
        if not isinstance(doc, dict):
            out.append(doc)
            continue
        ops: JsonPatch = []
        for name, template, path in _templates(doc):
            try:
                result = plan(template, options)
            except ValueError as exc:  # InjectError: a bad opus.io/* annotation
                raise OfflineError(f"document {number} ({name}): {exc}") from None
            outcomes.append(Outcome(number, name, result.inject, result.reason, result.warnings))
            ops += prefixed(result.ops, pointer(*path))
        out.append(_apply(doc, ops) if ops else doc)
    return out, outcomes


def inject_yaml(text: str, options: InjectOptions) -> tuple[str, list[Outcome]]:
    """Multi-document YAML in, multi-document YAML out (key order kept)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise OfflineError(f"invalid YAML: {exc}") from None
    out, outcomes = inject_documents(docs, options)
    return yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False), outcomes
