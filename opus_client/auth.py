"""The bearer token each call carries, and its renewal before `token_ttl` runs out.

`auth_token` is either a string, sent as is, or a provider (a callable returning a
fresh token, e.g. `opus_client.vault.Vault().token_provider(path)`). A provider is
called on the first call and again once 90% of `token_ttl` has passed since its last
token, so a token is replaced before it expires rather than after a call fails with
it. When a renewal fails while the old token has not yet reached its ttl, the old one is kept.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable

from opus_client.exceptions import TokenError

log = logging.getLogger("opus_client.auth")

TokenProvider = Callable[[], str]
AsyncTokenProvider = Callable[[], str | Awaitable[str]]
REFRESH_AT = 0.9  # renew at this fraction of the ttl


class TokenCache:
    """Which token to send, and when a new one is due; no I/O (`now` is passed in)."""

    def __init__(self, ttl: float | None) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError(f"token_ttl must be positive, not {ttl}")
        self.ttl = ttl
        self.token: str | None = None
        self.fetched_at = 0.0

    def current(self, now: float) -> str | None:
        """The cached token when it is not yet due for renewal."""
        if self.token is None:
            return None
        if self.ttl is not None and now - self.fetched_at >= self.ttl * REFRESH_AT:
            return None
        return self.token

    def still_valid(self, now: float) -> str | None:
        """The cached token when it has not reached its ttl (a fallback when renewal fails)."""
        if self.token is None or (self.ttl is not None and now - self.fetched_at >= self.ttl):
            return None
        return self.token

    def store(self, token: object, now: float) -> str:
        if not isinstance(token, str) or not token:
            raise TokenError(f"the token provider returned {type(token).__name__}, not a token")
        self.token, self.fetched_at = token, now
        return token


class _Fixed:
    """A fixed string: nothing can renew it, so say so once when its ttl has passed."""

    def __init__(self, token: str, ttl: float | None, clock: Callable[[], float]) -> None:
        if not token:
            raise ValueError("auth_token is empty")
        self.token = token
        self.expires = None if ttl is None else clock() + ttl
        self.clock = clock
        self.warned = False

    def get(self) -> str:
        if self.expires is not None and not self.warned and self.clock() >= self.expires:
            self.warned = True
            log.warning(
                "auth_token is a fixed string past its token_ttl; pass a callable "
                "(e.g. opus_client.vault.Vault().token_provider(path)) to renew it"
            )
        return self.token


class _TokenSource:
    """What both clients' tokens share: the fixed string, or the cache in front of a
    provider, and what to keep when a renewal fails. The shells only lock and call."""

    def __init__(
        self,
        source: str | Callable[[], object],
        ttl: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.fixed = _Fixed(source, ttl, clock) if isinstance(source, str) else None
        self.cache = TokenCache(ttl)
        self.clock = clock

    def ready(self) -> str | None:
        """The token to send when no renewal is due (checked again under the lock)."""
        if self.fixed is not None:
            return self.fixed.get()
        return self.cache.current(self.clock())

    def renewed(self, fresh: object, now: float) -> str:
        """The provider's result (`fresh`, or the exception it raised) fetched at `now`."""
        if not isinstance(fresh, Exception):
            try:
                return self.cache.store(fresh, now)
            except TokenError as exc:  # not a token
                fresh = exc
        token = self.cache.still_valid(now)
        if token is None:
            if isinstance(fresh, TokenError):
                raise fresh
            raise TokenError(f"the token provider failed: {fresh!r}") from fresh
        log.warning("token renewal failed (%r); keeping the current token until its ttl", fresh)
        return token


class Token(_TokenSource):
    """The sync clients' token: safe to share between threads (renewal runs once)."""

    def __init__(
        self, source: str | TokenProvider, ttl: float | None, clock: Callable[[], float]
    ) -> None:
        super().__init__(source, ttl, clock)
        self.provider = None if isinstance(source, str) else source
        self.lock = threading.Lock()

    def get(self) -> str:
        token = self.ready()
        if token is not None:
            return token
        assert self.provider is not None
        with self.lock:
            now = self.clock()
            token = self.cache.current(now)  # another thread may have renewed it meanwhile
            if token is not None:
                return token
            try:
                fresh: object = self.provider()
            except Exception as exc:
                fresh = exc
            return self.renewed(fresh, now)


class AsyncToken(_TokenSource):
    """The asyncio client's token. A plain (blocking) provider runs in a worker thread."""

    def __init__(
        self, source: str | AsyncTokenProvider, ttl: float | None, clock: Callable[[], float]
    ) -> None:
        super().__init__(source, ttl, clock)
        self.provider = None if isinstance(source, str) else source
        self.lock = asyncio.Lock()

    async def get(self) -> str:
        token = self.ready()
        if token is not None:
            return token
        assert self.provider is not None
        async with self.lock:
            now = self.clock()
            token = self.cache.current(now)
            if token is not None:
                return token
            try:
                if inspect.iscoroutinefunction(self.provider):
                    fresh: object = await self.provider()
                else:
                    fresh = await asyncio.to_thread(self.provider)
                    if inspect.isawaitable(fresh):
                        fresh = await fresh
            except Exception as exc:
                fresh = exc
            return self.renewed(fresh, now)
