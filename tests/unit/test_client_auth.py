"""Token renewal (opus_client.auth) on an injected clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from opus_client.auth import AsyncToken, Token
from opus_client.exceptions import TokenError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Provider:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> str:
        if self.fail:
            raise OSError("vault down")
        self.calls += 1
        return f"t{self.calls}"


def test_provider_is_called_again_before_the_ttl_runs_out() -> None:
    clock, provider = Clock(), Provider()
    token = Token(provider, 3600, clock)
    assert token.get() == "t1"
    clock.now += 3000
    assert token.get() == "t1"
    clock.now += 300  # 3300 s: past 90% of the ttl, before the ttl itself
    assert token.get() == "t2"
    assert provider.calls == 2


def test_without_ttl_the_provider_is_called_once() -> None:
    clock, provider = Clock(), Provider()
    token = Token(provider, None, clock)
    clock.now += 1e9
    assert (token.get(), token.get(), provider.calls) == ("t1", "t1", 1)


def test_a_failed_renewal_keeps_the_token_until_its_ttl() -> None:
    clock, provider = Clock(), Provider()
    token = Token(provider, 100, clock)
    token.get()
    provider.fail = True
    clock.now += 95
    assert token.get() == "t1"
    clock.now += 10
    with pytest.raises(TokenError, match="vault down"):
        token.get()


def test_a_provider_returning_no_token_is_an_error() -> None:
    with pytest.raises(TokenError, match="NoneType"):
        Token(lambda: None, None, Clock()).get()  # type: ignore[arg-type,return-value]


def test_a_fixed_token_past_its_ttl_is_kept_and_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    token = Token("s3cret", 10, clock)
    assert token.get() == "s3cret"
    assert not caplog.records
    clock.now += 11
    with caplog.at_level(logging.WARNING, "opus_client.auth"):
        assert token.get() == "s3cret"
        assert token.get() == "s3cret"
    assert len(caplog.records) == 1


def test_async_token_takes_sync_and_async_providers() -> None:
    clock, provider = Clock(), Provider()

    async def async_provider() -> str:
        return "a1"

    async def main() -> tuple[str, str, str]:
        sync = AsyncToken(provider, 10, clock)
        first = await sync.get()
        clock.now += 9.5
        second = await sync.get()
        return first, second, await AsyncToken(async_provider, None, clock).get()

    assert asyncio.run(main()) == ("t1", "t2", "a1")
