"""A tiny blocking HTTP client for the demo orchestrator (stdlib only).

The orchestrator is synchronous on purpose: it starts processes, polls them and
prints, so an event loop would only add shutdown paths to get wrong.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

# No ProxyHandler entries: a user's HTTP_PROXY must not capture calls to 127.0.0.1
# (the demo may well be run with HTTP_PROXY pointing at a sidecar).
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Message
    body: bytes
    latency_ms: float

    def header(self, name: str) -> str:
        return self.headers.get(name) or "-"


def request(method: str, url: str, payload: object | None = None, timeout: float = 10.0) -> Reply:
    """One HTTP call; non-2xx answers are returned, not raised. Raises OSError when unreachable."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    started = time.perf_counter()
    try:
        with _opener.open(req, timeout=timeout) as resp:
            body = resp.read()
            status, headers = resp.status, resp.headers
    except urllib.error.HTTPError as err:
        body = err.read()
        status, headers = err.code, err.headers
    return Reply(status, headers, body, (time.perf_counter() - started) * 1000)
