"""The unit tier waits for nothing in real time.

Timers are driven with fake clocks (tests/unit/faketime.py, test_limits' FakeClockLoop).
This guard makes a test fail that slept for real instead: a `time.sleep` asked for more
than `MAX_REAL_SLEEP`, or an `asyncio.sleep` that ran to its end and took more than that
of wall-clock time (a sleep on a VirtualTimeLoop waits for no timer, and a sleep that is
cancelled, such as a poll loop's when its backend closes, kept nobody waiting).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.faketime import VirtualTimeLoop

MAX_REAL_SLEEP = 0.05

# Tests that wait on something outside the process (a child process starting), by
# nodeid prefix: they poll in short sleeps, each under the limit, and are named here so
# that any new one is a decision.
REAL_TIME_ALLOWED: tuple[str, ...] = ()


@pytest.fixture(autouse=True)
def no_real_sleeps(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if REAL_TIME_ALLOWED and request.node.nodeid.startswith(REAL_TIME_ALLOWED):
        yield
        return
    slept: list[str] = []
    real_time_sleep = time.sleep
    real_asyncio_sleep = asyncio.sleep

    def guarded_time_sleep(seconds: float) -> None:
        if seconds > MAX_REAL_SLEEP:
            slept.append(f"time.sleep({seconds})")
        real_time_sleep(seconds)

    async def guarded_asyncio_sleep(delay: float, result: Any = None) -> Any:
        if delay <= MAX_REAL_SLEEP:
            return await real_asyncio_sleep(delay, result)
        if isinstance(asyncio.get_running_loop(), VirtualTimeLoop):
            # Its clock jumps to the next timer when idle: no sleep there waits for time
            # to pass (what real time it takes is the loop busy with its sockets).
            return await real_asyncio_sleep(delay, result)
        started = time.perf_counter()
        value = await real_asyncio_sleep(delay, result)
        took = time.perf_counter() - started
        if took > MAX_REAL_SLEEP:
            slept.append(f"asyncio.sleep({delay}) took {took:.3f} s of real time")
        return value

    monkeypatch.setattr(time, "sleep", guarded_time_sleep)
    monkeypatch.setattr(asyncio, "sleep", guarded_asyncio_sleep)
    yield
    if slept:
        pytest.fail(
            "the unit tier does not wait in real time; drive a fake clock instead "
            f"(tests/unit/faketime.py): {'; '.join(slept)}",
            pytrace=False,
        )
