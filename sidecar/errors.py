"""The mesh's exception tree and the one place its errors become replies.

Errors raised on a call's path carry the status the caller should see, a short
reason and the access-log flag; `error_response()` renders them as a small JSON
body, or as a trailers-only gRPC status for gRPC callers. `error_body()` is that JSON
body alone, also what the HTTP/1.1 server writes when it rejects a request outright.
"""

from __future__ import annotations

import json

from sidecar.messages import Headers, Response, fixed_body

# HTTP status -> gRPC status code (grpc/doc/http-grpc-status-mapping.md).
_GRPC_STATUS = {
    400: 13,
    401: 16,
    403: 7,
    404: 12,
    408: 4,
    413: 8,
    429: 14,
    502: 14,
    503: 14,
    504: 4,
}


class MeshError(Exception):
    """A call the mesh answers itself. `flag` is the access-log response flag."""

    status = 503
    flag = "LR"

    def __init__(self, reason: str, *, service: str = "", status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.service = service
        if status is not None:
            self.status = status


class UnknownService(MeshError):
    flag = "NR"  # no route


class NoHealthyUpstream(MeshError):
    flag = "UH"


class UpstreamConnectError(MeshError):
    """Connecting to the endpoint failed: the peer never saw the request, so a resend is safe."""

    flag = "UF"


class UpstreamIdentityError(UpstreamConnectError):
    """mTLS: the peer's certificate is valid but names another workload than the target
    service's (secure naming), or the handshake failed; nothing was sent to it."""


class StreamRefused(MeshError):
    """The peer refused the stream unprocessed (REFUSED_STREAM, above GOAWAY's last id)."""

    flag = "UR"


class UpstreamReset(MeshError):
    """The upstream reset or dropped the call after it may have been processed."""

    status = 502
    flag = "UC"


class PoolExhausted(MeshError):
    flag = "UO"  # upstream overflow


class UpstreamTimeout(MeshError):
    status = 504
    flag = "UT"


class BadRequest(MeshError):
    status = 400
    flag = "DPE"  # downstream protocol error


# Errors after which the request is known not to have been processed upstream.
RETRY_SAFE = (UpstreamConnectError, StreamRefused)


JSON = b"application/json"


def error_body(
    status: int, reason: str, service: str = "", *, spaced: bool = False
) -> tuple[bytes, bytes]:
    """The JSON body of an error reply, and its content type.

    spaced: json.dumps' default separators (", ", ": "), as the HTTP/1.1 server's
    rejections have always been written (h1server._rejection); else compact, as the
    replies to calls are (error_response).
    """
    payload: dict[str, object] = {"error": reason, "status": status}
    if service:
        payload["service"] = service
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(payload, separators=separators).encode(), JSON


def error_response(error: MeshError, *, grpc: bool = False) -> Response:
    if grpc:
        # Trailers-only gRPC reply: HTTP 200 with the status in the headers.
        code = _GRPC_STATUS.get(error.status, 2)
        headers: Headers = [
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(code).encode()),
            (b"grpc-message", _grpc_percent_encode(error.reason)),
            (b"x-opus-error", error.flag.encode()),
        ]
        return Response(200, headers, fixed_body())
    body, content_type = error_body(error.status, error.reason, error.service)
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-opus-error", error.flag.encode()),
    ]
    return Response(error.status, headers, fixed_body(body))


def _grpc_percent_encode(text: str) -> bytes:
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
