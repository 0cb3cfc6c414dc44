"""The mesh's errors and how error_response renders them."""

from __future__ import annotations

import json

import pytest

from sidecar.errors import (
    RETRY_SAFE,
    BadRequest,
    MeshError,
    NoHealthyUpstream,
    PoolExhausted,
    StreamRefused,
    UnknownService,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
    error_response,
)
from sidecar.messages import Response

CASES = [
    (MeshError, 503, "LR", 14),
    (UnknownService, 503, "NR", 14),
    (NoHealthyUpstream, 503, "UH", 14),
    (UpstreamConnectError, 503, "UF", 14),
    (StreamRefused, 503, "UR", 14),
    (UpstreamReset, 502, "UC", 14),
    (PoolExhausted, 503, "UO", 14),
    (UpstreamTimeout, 504, "UT", 4),
    (BadRequest, 400, "DPE", 13),
]


def body_of(response: Response) -> bytes:
    assert response.body.complete
    return response.body.read_nowait() or b""


@pytest.mark.parametrize(("cls", "status", "flag", "grpc_code"), CASES)
def test_json_error_reply(cls: type[MeshError], status: int, flag: str, grpc_code: int) -> None:
    response = error_response(cls("it broke", service="payment"))
    assert response.status == status
    body = body_of(response)
    assert json.loads(body) == {"error": "it broke", "status": status, "service": "payment"}
    assert response.headers == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-opus-error", flag.encode()),
    ]


@pytest.mark.parametrize(("cls", "status", "flag", "grpc_code"), CASES)
def test_grpc_error_reply_is_trailers_only_with_http_200(
    cls: type[MeshError], status: int, flag: str, grpc_code: int
) -> None:
    response = error_response(cls("it broke"), grpc=True)
    assert response.status == 200
    assert body_of(response) == b""
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == str(grpc_code).encode()
    assert headers[b"grpc-message"] == b"it broke"
    assert headers[b"x-opus-error"] == flag.encode()


def test_json_reply_leaves_out_an_empty_service() -> None:
    assert json.loads(body_of(error_response(UnknownService("no route")))) == {
        "error": "no route",
        "status": 503,
    }


def test_status_override() -> None:
    error = MeshError("slow down", status=429)
    assert error_response(error).status == 429
    assert dict(error_response(error, grpc=True).headers)[b"grpc-status"] == b"14"


def test_grpc_status_for_an_unmapped_http_status_is_unknown() -> None:
    response = error_response(MeshError("boom", status=500), grpc=True)
    assert dict(response.headers)[b"grpc-status"] == b"2"


def test_grpc_message_is_percent_encoded() -> None:
    response = error_response(UpstreamTimeout("café 100%\nlate"), grpc=True)
    assert dict(response.headers)[b"grpc-message"] == b"caf%C3%A9 100%25%0Alate"


def test_only_unprocessed_failures_are_retry_safe() -> None:
    assert isinstance(StreamRefused("x"), RETRY_SAFE)
    assert isinstance(UpstreamConnectError("x"), RETRY_SAFE)
    assert not isinstance(UpstreamReset("x"), RETRY_SAFE)
    assert not isinstance(UpstreamTimeout("x"), RETRY_SAFE)


def test_one_renderer_for_replies_and_the_h1_servers_rejections() -> None:
    from sidecar.adapters.h1server import _rejection
    from sidecar.errors import error_body

    assert error_body(503, "no route", "payment") == (
        b'{"error":"no route","status":503,"service":"payment"}',
        b"application/json",
    )
    assert (
        body_of(error_response(UnknownService("no route", service="payment")))
        == (error_body(503, "no route", "payment")[0])
    )
    # The rejection's bytes on the wire, as they were before it used error_body.
    assert _rejection(400, "malformed HTTP/1.1 request: bad") == (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"content-length: 59\r\nconnection: close\r\n\r\n"
        b'{"error": "malformed HTTP/1.1 request: bad", "status": 400}'
    )
