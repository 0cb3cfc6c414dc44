"""x-forwarded-for at the inbound: the app sees one header whose last hop is the real peer,
however many x-forwarded-for headers the caller sent (issue 15, finding 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.inbound import _append_forwarded_for
from sidecar.messages import Headers, Request
from tests.unit.test_h1_callbacks import Rig, request

XFF = b"x-forwarded-for"


def forwarded(headers: Headers, peer: str = "10.0.0.7:5000") -> Headers:
    req = Request(b"GET", b"/", b"inventory", list(headers), None, peer=peer)  # type: ignore[arg-type]
    _append_forwarded_for(req)
    return req.headers


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ([(b"a", b"1")], [(b"a", b"1"), (XFF, b"10.0.0.7")]),
        ([(XFF, b"6.6.6.6"), (b"a", b"1")], [(XFF, b"6.6.6.6, 10.0.0.7"), (b"a", b"1")]),
        ([(XFF, b"")], [(XFF, b"10.0.0.7")]),
        (
            [(b"a", b"1"), (XFF, b"1.1.1.1"), (b"b", b"2"), (XFF, b"6.6.6.6"), (b"c", b"3")],
            [(b"a", b"1"), (XFF, b"1.1.1.1, 6.6.6.6, 10.0.0.7"), (b"b", b"2"), (b"c", b"3")],
        ),
        (
            [(XFF, b"1.1.1.1, 2.2.2.2"), (XFF, b""), (XFF, b"6.6.6.6")],
            [(XFF, b"1.1.1.1, 2.2.2.2, 6.6.6.6, 10.0.0.7")],
        ),
    ],
    ids=["none", "one", "one-empty", "two-apart", "three"],
)
def test_every_forwarded_for_is_merged_into_one_then_the_peer_appended(
    sent: Headers, expected: Headers
) -> None:
    assert forwarded(sent) == expected


def test_no_peer_leaves_the_headers_alone() -> None:
    sent = [(XFF, b"1.1.1.1"), (XFF, b"6.6.6.6")]
    assert forwarded(sent, peer="") == sent


@pytest.mark.parametrize("callbacks", [True, False])
def test_the_app_gets_one_forwarded_for_ending_in_the_peer(tmp_path: Path, callbacks: bool) -> None:
    """Through the real inbound listener and pool, on both call paths: two headers from
    the caller reach the app as one, in order, with the caller's address last."""

    async def go() -> bytes:
        rig = Rig("inbound", tmp_path, callbacks=callbacks)
        proto, caller = rig.caller()
        extra = b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 6.6.6.6\r\n"
        proto.data_received(request(b"/a", extra=extra))
        await rig.settle()
        rig.access_log.close()
        assert b"200 OK" in caller.data
        return rig.app_sides[0].data

    head = asyncio.run(go()).split(b"\r\n\r\n", 1)[0].lower()
    lines = [line for line in head.split(b"\r\n") if line.startswith(XFF + b":")]
    assert lines == [b"x-forwarded-for: 1.1.1.1, 6.6.6.6, 10.0.0.7"]
