"""AsyncOpusClient over httpx.MockTransport: retries, deadlines and cancellation."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from opus_client import AsyncOpusClient, CallTimeout, NonRetryableError, RetryableError


class Script:
    def __init__(self, *statuses: int, delay: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.requests: list[httpx.Request] = []
        self.seen = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.seen.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status, json={"status": status})


def client(script: Script, **kw: object) -> AsyncOpusClient:
    kw.setdefault("retry_delay", 0.0)
    return AsyncOpusClient(
        "http://sidecar:8080",
        transport=httpx.MockTransport(script),
        **kw,  # type: ignore[arg-type]
    )


def test_retries_then_returns() -> None:
    script = Script(503, 429, 200)

    async def main() -> int:
        async with client(script, auth_token="t") as c:
            reply = await c.call_service("payment", "create", {"amount": 100})
            return reply.attempts

    assert asyncio.run(main()) == 3
    assert [r.headers["x-opus-client-attempt"] for r in script.requests] == ["1", "2", "3"]
    assert script.requests[0].headers["authorization"] == "Bearer t"


def test_errors() -> None:
    async def main() -> None:
        async with client(Script(503), max_retries=1) as c:
            with pytest.raises(RetryableError) as info:
                await c.call_service("svc", "m")
            assert info.value.attempts == 2
        async with client(Script(400)) as c:
            with pytest.raises(NonRetryableError):
                await c.call_service("svc", "m")

    asyncio.run(main())


def test_deadline_fires_mid_attempt() -> None:
    script = Script(200, delay=5.0)

    async def main() -> None:
        async with client(script) as c:
            with pytest.raises(CallTimeout):
                await c.call_service("svc", "slow", timeout=0.05)

    asyncio.run(main())
    assert len(script.requests) == 1


def test_cancelling_the_task_stops_the_call() -> None:
    script = Script(503)

    async def main() -> None:
        async with client(script, retry_delay=30.0, timeout=None) as c:
            task = asyncio.create_task(c.call_service("svc", "m"))
            await script.seen.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert len(script.requests) == 1
