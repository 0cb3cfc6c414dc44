"""The reply of one call, read whole: status, headers, body, and ways to decode it."""

from __future__ import annotations

import json
from typing import Any, Protocol, TypeVar, runtime_checkable

import httpx

from opus_client.exceptions import DecodeError

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"


@runtime_checkable
class ProtoMessage(Protocol):
    """What opus_client needs of a protobuf message (duck-typed: protobuf stays optional)."""

    def SerializeToString(self) -> bytes: ...

    def ParseFromString(self, serialized: bytes) -> Any: ...


M = TypeVar("M", bound=ProtoMessage)


class Response:
    """A successful (2xx or 3xx) reply. `attempts` counts the client's tries, 1 when not retried."""

    __slots__ = ("attempts", "content", "headers", "status_code")

    def __init__(
        self, status_code: int, headers: httpx.Headers, content: bytes, attempts: int = 1
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.attempts = attempts

    @property
    def text(self) -> str:
        charset = "utf-8"
        for param in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:  # an unknown charset name
            return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError as exc:
            raise DecodeError(f"reply body is not JSON: {exc}") from exc

    def protobuf(self, message_type: type[M]) -> M:
        """Decode the body into a new `message_type` (a generated protobuf message class)."""
        message = message_type()
        try:
            message.ParseFromString(self.content)
        except Exception as exc:  # protobuf's DecodeError; protobuf itself is optional
            raise DecodeError(f"reply body is not a {message_type.__name__}: {exc}") from exc
        return message

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}] {len(self.content)} bytes>"
