"""What both clients share: their settings, checked once, and one call's request
(URL, encoded body, headers per attempt) before any I/O."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from opus_client.response import PROTOBUF_CONTENT_TYPE, ProtoMessage
from opus_client.retry import RetryPolicy, RetryState
from opus_client.signing import Signer, forwarded_path

DEFAULT_BASE_URL = "http://localhost:8080"
BASE_URL_ENV = "OPUS_SIDECAR_URL"
DEFAULT_TIMEOUT = 10.0

# Request headers the client adds (docs/client.md, "How retries combine").
ATTEMPT_HEADER = "x-opus-client-attempt"  # 1 on the first try, 2 on the first resend, ...
RETRYABLE_HEADER = "x-opus-retryable"  # the caller vouches the call is idempotent
DEADLINE_HEADER = "x-opus-deadline-ms"  # time left of the call's timeout

Headers = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Settings:
    base_url: httpx.URL
    retry: RetryPolicy
    timeout: float | None
    attempt_timeout: float | None
    headers: tuple[tuple[str, str], ...]
    signer: Signer | None


def make_settings(
    base_url: str | None,
    max_retries: int,
    retry_delay: float,
    timeout: float | None,
    attempt_timeout: float | None,
    headers: Headers | None,
    signing_key: bytes | str | None,
    signing_key_id: str | None,
) -> Settings:
    url = httpx.URL(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base_url must be an http(s) URL with a host, not {str(url)!r}")
    for name, value in (("timeout", timeout), ("attempt_timeout", attempt_timeout)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, not {value}")
    return Settings(
        url,
        RetryPolicy(max_retries, retry_delay),
        timeout,
        attempt_timeout,
        tuple((headers or {}).items()),
        Signer(signing_key, signing_key_id) if signing_key is not None else None,
    )


def encode_body(body: Any) -> tuple[bytes, str | None]:
    """The bytes sent and their default content type."""
    if body is None:
        return b"", None
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), "application/octet-stream"
    if isinstance(body, ProtoMessage):
        return body.SerializeToString(), PROTOBUF_CONTENT_TYPE
    try:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"body must be JSON-serialisable, bytes or a protobuf message: {exc}"
        ) from exc
    return text.encode(), "application/json"


class PreparedCall:
    """One call_service() call: built once, then sent once per attempt."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        method: str,
        body: Any,
        headers: Headers | None,
        timeout: float | None,
        idempotent: bool,
        now: float,
    ) -> None:
        if not service or "/" in service or "?" in service:
            raise ValueError(f"service must be a name without '/' or '?', not {service!r}")
        base = settings.base_url
        path, has_query, query = f"/v1/invoke/{service}/{method.lstrip('/')}".partition("?")
        self.url = base.copy_with(
            path=base.path.rstrip("/") + path, query=query.encode() if has_query else None
        )
        self.content, content_type = encode_body(body)
        merged = httpx.Headers(settings.headers)
        if content_type is not None:
            merged["content-type"] = content_type
        merged.update(headers or {})
        self.headers = merged
        self.signer = settings.signer
        self.signed_path = forwarded_path(self.url.raw_path) if self.signer else b""
        timeout = settings.timeout if timeout is None else timeout
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.idempotent = idempotent
        self.state = RetryState(
            settings.retry,
            f"{service}.{method}",
            idempotent=idempotent,
            deadline=None if timeout is None else now + timeout,
            attempt_timeout=settings.attempt_timeout,
        )

    def attempt_headers(
        self, time_left: float | None, token: str | None, wall_now: float
    ) -> httpx.Headers:
        headers = self.headers.copy()
        headers[ATTEMPT_HEADER] = str(self.state.attempts)
        if self.idempotent:
            headers[RETRYABLE_HEADER] = "true"
        if time_left is not None:
            headers[DEADLINE_HEADER] = str(max(1, int(time_left * 1000)))
        if token is not None and "authorization" not in headers:
            headers["authorization"] = f"Bearer {token}"
        if self.signer is not None:
            signed = self.signer.headers("POST", self.signed_path, self.content, int(wall_now))
            headers.update(signed)
        return headers
