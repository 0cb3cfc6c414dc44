"""The mutating admission webhook: AdmissionReview v1 in, AdmissionReview v1 out, over HTTPS.

`review()` is the whole protocol, without sockets: request bytes in, (HTTP status,
JSON reply) out. `serve()` is the thin aiohttp adapter around it.

What callers get (the failurePolicy in deploy/k8s is Fail):
- a body that is not an AdmissionReview v1 with a request uid: HTTP 400 and a JSON
  `error` (there is no uid to echo, so no review can answer it); the API server counts
  it as a failed call and applies failurePolicy;
- anything but a Pod CREATE, and pods not opted in: allowed, no patch (a warning says why
  when the request was unexpected);
- an opted-in pod with a bad opus.io/* annotation: allowed false, code 400, a message
  naming the annotation;
- a bug while building the patch: allowed false, code 500 (logged); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.inject.patch import InjectError, InjectOptions, plan

log = logging.getLogger("sidecar.inject")

API_VERSION = "admission.k8s.io/v1"
INJECT_PATHS = ("/inject", "/mutate")
# The API server caps objects near 3 MiB; leave room for the review around the pod.
MAX_BODY = 8 * 1024 * 1024

Reply = tuple[int, dict[str, Any]]


def _error(message: str) -> Reply:
    return 400, {"error": message}


def _review(uid: str, **response: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, **response},
    }


def _describe(request: dict[str, Any]) -> str:
    obj = request.get("object")
    meta: Any = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or f"{meta.get('generateName') or ''}<generated>"
    return f"{request.get('namespace') or meta.get('namespace') or '-'}/{name}"


def review(body: bytes, options: InjectOptions) -> Reply:
    """Answer one AdmissionReview request body: (HTTP status, JSON reply)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error(f"body is not JSON: {exc}")
    if not isinstance(doc, dict):
        return _error("body must be a JSON object (an AdmissionReview)")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview":
        return _error(
            f"expected apiVersion {API_VERSION} kind AdmissionReview, got "
            f"apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r} "
            "(set admissionReviewVersions: [v1])"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        return _error("AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return _error("AdmissionReview request has no uid")

    kind: dict[str, Any] = request["kind"] if isinstance(request.get("kind"), dict) else {}
    operation = request.get("operation")
    if kind.get("kind") != "Pod" or kind.get("group", "") != "" or operation != "CREATE":
        what = f"{kind.get('kind')!r} {operation!r}"
        return 200, _review(
            uid, allowed=True, warnings=[f"opus-sidecar injector: ignored {what}: only Pod CREATE"]
        )
    pod = request.get("object")
    if not isinstance(pod, dict):
        return 200, _review(
            uid, allowed=True, warnings=["opus-sidecar injector: request has no Pod object"]
        )
    where = _describe(request)
    try:
        result = plan(pod, options)
    except InjectError as exc:
        log.info("refused %s: %s", where, exc)
        return 200, _review(
            uid,
            allowed=False,
            status={"code": 400, "message": f"opus-sidecar injector: {exc}"},
        )
    except Exception as exc:  # a bug: reject this pod (failurePolicy Fail) and keep serving
        log.exception("internal error injecting %s", where)
        return 200, _review(
            uid,
            allowed=False,
            status={"code": 500, "message": f"opus-sidecar injector: internal error: {exc!r}"},
        )
    if not result.inject:
        log.debug("skipped %s: %s", where, result.reason)
        return 200, _review(uid, allowed=True)
    log.info("injected %s (%d ops)", where, len(result.ops))
    patch = base64.b64encode(json.dumps(result.ops, separators=(",", ":")).encode()).decode()
    response: dict[str, Any] = {"allowed": True, "patchType": "JSONPatch", "patch": patch}
    if result.warnings:
        response["warnings"] = [f"opus-sidecar injector: {w}" for w in result.warnings]
    return 200, _review(uid, **response)


def make_app(options: InjectOptions) -> web.Application:
    async def inject(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return web.json_response(
                {"error": f"Content-Type must be application/json, got {request.content_type}"},
                status=415,
            )
        status, payload = review(await request.read(), options)
        return web.json_response(payload, status=status)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "UP"})

    app = web.Application(client_max_size=MAX_BODY)
    for path in INJECT_PATHS:
        app.router.add_post(path, inject)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(
    options: InjectOptions,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    ports_file: Path | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    runner = web.AppRunner(make_app(options), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound: int = runner.addresses[0][1]
        if ports_file is not None:
            tmp = ports_file.with_name(f".{ports_file.name}.tmp")
            tmp.write_text(json.dumps({"port": bound}))
            tmp.replace(ports_file)
        log.info("injector listening on https://%s:%d%s", host, bound, INJECT_PATHS[0])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    return 0
