"""Body: the streamed body between one producer and one consumer, and the call heads."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.messages import (
    HOP_BY_HOP,
    REPLAY_LIMIT,
    Body,
    BodyError,
    Request,
    fixed_body,
    unsafe_header,
)


async def read_all(body: Body) -> list[bytes]:
    chunks = []
    while chunk := await body.read():
        chunks.append(chunk)
    return chunks


def test_read_returns_chunks_in_order_then_empty_at_end() -> None:
    async def go() -> None:
        body = Body()
        for chunk in (b"one", b"two", b"three"):
            assert body.feed(chunk)
        body.finish([(b"grpc-status", b"0")])
        assert body.complete
        assert body.received == 11
        assert await read_all(body) == [b"one", b"two", b"three"]
        assert await body.read() == b""
        assert body.at_eof
        assert body.trailers == [(b"grpc-status", b"0")]

    asyncio.run(go())


def test_read_waits_for_the_producer() -> None:
    async def go() -> None:
        body = Body()
        reader = asyncio.create_task(read_all(body))
        await asyncio.sleep(0)
        assert not reader.done()
        body.feed(b"late")
        await asyncio.sleep(0)
        assert not reader.done()
        body.finish()
        assert await reader == [b"late"]

    asyncio.run(go())


def test_on_consumed_gets_the_flow_size_of_each_chunk_as_it_is_read() -> None:
    async def go() -> None:
        body = Body()
        consumed: list[int] = []
        body.on_consumed = consumed.append
        body.feed(b"abc", 12)  # padded HTTP/2 DATA: flow size above the payload
        body.feed(b"de")
        assert body.buffered == 14
        assert consumed == []  # nothing returned before the consumer reads
        assert await body.read() == b"abc"
        assert consumed == [12]
        assert body.buffered == 2
        assert await body.read() == b"de"
        assert consumed == [12, 2]
        assert body.buffered == 0

    asyncio.run(go())


def test_feed_after_finish_is_refused() -> None:
    body = Body()
    body.finish()
    assert body.feed(b"x") is False
    assert body.received == 0


def test_rewind_replays_every_chunk_read_without_counting_flow_again() -> None:
    async def go() -> None:
        body = Body()
        consumed: list[int] = []
        body.on_consumed = consumed.append
        body.feed(b"a")
        body.feed(b"b")
        body.feed(b"c")
        body.finish()
        assert await body.read() == b"a"
        assert await body.read() == b"b"
        assert consumed == [1, 1]
        assert body.rewind()
        assert await read_all(body) == [b"a", b"b", b"c"]
        # The replayed chunks were accounted the first time round; only "c" is new.
        assert consumed == [1, 1, 1]
        # A second rewind replays the whole body again.
        assert body.rewind()
        assert b"".join(await read_all(body)) == b"abc"

    asyncio.run(go())


def test_rewind_keeps_exactly_replay_limit_bytes() -> None:
    async def go() -> None:
        body = Body()
        body.feed(b"x" * (REPLAY_LIMIT - 1))
        body.feed(b"y")
        body.finish()
        assert len(b"".join(await read_all(body))) == REPLAY_LIMIT
        assert body.rewind()
        assert b"".join(await read_all(body)) == b"x" * (REPLAY_LIMIT - 1) + b"y"

    asyncio.run(go())


def test_rewind_refuses_once_more_than_replay_limit_was_read() -> None:
    async def go() -> None:
        body = Body()
        body.feed(b"x" * REPLAY_LIMIT)
        body.feed(b"!")
        body.finish()
        await read_all(body)
        assert body.rewind() is False
        assert await body.read() == b""  # nothing was put back

    asyncio.run(go())


def test_rewind_refuses_past_the_limit_through_read_nowait_too() -> None:
    body = Body()
    body.feed(b"x" * (REPLAY_LIMIT + 1))
    assert body.read_nowait() == b"x" * (REPLAY_LIMIT + 1)
    assert body.rewind() is False


def test_fail_makes_read_raise_body_error_after_the_buffered_chunks() -> None:
    async def go() -> None:
        body = Body()
        body.feed(b"partial")
        body.fail(ConnectionResetError("peer reset"))
        assert not body.complete
        assert await body.read() == b"partial"
        with pytest.raises(BodyError, match="peer reset") as info:
            await body.read()
        assert isinstance(info.value.__cause__, ConnectionResetError)

    asyncio.run(go())


def test_fail_wakes_a_waiting_reader() -> None:
    async def go() -> None:
        body = Body()
        reader = asyncio.create_task(body.read())
        await asyncio.sleep(0)
        body.fail(RuntimeError("gone"))
        with pytest.raises(BodyError, match="gone"):
            await reader

    asyncio.run(go())


def test_fail_after_finish_is_ignored() -> None:
    async def go() -> None:
        body = Body()
        body.feed(b"whole")
        body.finish()
        body.fail(RuntimeError("too late"))
        assert body.complete
        assert await read_all(body) == [b"whole"]

    asyncio.run(go())


def test_discard_returns_buffered_flow_once_and_drops_later_feeds() -> None:
    body = Body()
    consumed: list[int] = []
    body.on_consumed = consumed.append
    body.feed(b"abc", 8)
    body.feed(b"de")
    body.discard()
    assert consumed == [10]
    assert body.buffered == 0
    assert body.at_eof
    assert body.feed(b"more", 4) is False
    assert consumed == [10]  # the caller returns a dropped chunk's window itself
    assert body.rewind() is False


def test_discard_of_an_empty_body_reports_nothing() -> None:
    body = Body()
    consumed: list[int] = []
    body.on_consumed = consumed.append
    body.discard()
    assert consumed == []


def test_read_nowait_joins_everything_buffered() -> None:
    body = Body()
    consumed: list[int] = []
    body.on_consumed = consumed.append
    assert body.read_nowait() is None
    body.feed(b"ab", 5)
    body.feed(b"cd")
    assert body.read_nowait() == b"abcd"
    assert consumed == [7]
    assert body.buffered == 0
    assert body.read_nowait() is None
    assert body.rewind()
    assert body.read_nowait() == b"abcd"


def test_cancel_runs_on_cancel_once_and_returns_unread_window() -> None:
    body = Body()
    calls: list[str] = []
    consumed: list[int] = []
    body.on_cancel = lambda: calls.append("cancel")
    body.on_consumed = consumed.append
    body.feed(b"xyz", 5)
    body.cancel()
    body.cancel()
    assert calls == ["cancel"]
    # The unread chunk's flow-control size goes back once; nothing is left to read.
    assert consumed == [5]
    assert body.read_nowait() is None
    assert body.rewind() is False


def test_an_empty_chunk_mid_body_is_not_the_end() -> None:
    async def go() -> None:
        body = Body()
        consumed: list[int] = []
        body.on_consumed = consumed.append
        body.feed(b"a")
        body.feed(b"", 9)  # DATA frame with only padding, or zero-length DATA
        body.feed(b"b")
        body.finish()
        assert b"".join(await read_all(body)) == b"ab"
        assert sum(consumed) == 11

    asyncio.run(go())


def test_fixed_body_is_complete_with_its_trailers() -> None:
    body = fixed_body(b"payload", [(b"x-t", b"1")])
    assert body.complete
    assert body.read_nowait() == b"payload"
    assert body.trailers == [(b"x-t", b"1")]
    assert fixed_body().read_nowait() is None


def test_request_header_lookup_and_grpc_detection() -> None:
    grpc = Request(
        b"POST",
        b"/pkg.Svc/M",
        b"svc",
        [(b"content-type", b"application/grpc+proto"), (b"x-a", b"1"), (b"x-a", b"2")],
        fixed_body(),
    )
    assert grpc.header(b"x-a") == b"1"
    assert grpc.header(b"missing") is None
    assert grpc.is_grpc
    plain = Request(b"GET", b"/", b"svc", [(b"content-type", b"text/plain")], fixed_body())
    assert not plain.is_grpc
    assert not Request(b"GET", b"/", b"svc", [], fixed_body()).is_grpc


def test_hop_by_hop_set_keeps_end_to_end_headers_out() -> None:
    assert {b"connection", b"transfer-encoding", b"upgrade", b"host", b"keep-alive"} <= HOP_BY_HOP
    assert b"te" not in HOP_BY_HOP  # `te: trailers` must survive for gRPC
    assert b"content-length" not in HOP_BY_HOP


@pytest.mark.parametrize(
    ("headers", "bad"),
    [
        ([(b"a", b"ok"), (b"b", b"x\ry")], b"b"),
        ([(b"a", b"x\ny")], b"a"),
        ([(b"a", b"x\0y")], b"a"),
        ([(b"a\r", b"ok")], b"a\r"),
        ([(b"a\nb", b"ok")], b"a\nb"),
        ([(b"a", b"ok"), (b"b", b"\t tab and 1310 digits")], None),
    ],
)
def test_unsafe_header_names_the_first_header_holding_cr_lf_or_nul(
    headers: list[tuple[bytes, bytes]], bad: bytes | None
) -> None:
    assert unsafe_header(headers) == bad
