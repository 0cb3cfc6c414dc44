"""`AsyncOpusClient`: the asyncio client; `await call_service(...)` is the seed's Go
`AsyncCall` with its context: wrap it in `asyncio.timeout()` or cancel its task, and
the call stops where it is, attempt or backoff wait alike.

One `httpx.AsyncClient` per AsyncOpusClient holds the connection pool, so concurrent
calls share its keep-alive connections to the sidecar.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from opus_client._call import DEFAULT_TIMEOUT, Headers, PreparedCall, make_settings
from opus_client._steps import Outcome, Wait, advance, call_steps
from opus_client.auth import AsyncToken, AsyncTokenProvider
from opus_client.exceptions import ClientClosedError
from opus_client.response import Response


class AsyncOpusClient:
    """The asyncio twin of `opus_client.OpusClient`; the same settings mean the same.

    auth_token may also be an async callable; a plain callable runs in a worker thread,
    so a blocking provider (Vault over HTTP) does not stall the event loop.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        max_retries: int = 3,
        retry_delay: float = 0.5,
        timeout: float | None = DEFAULT_TIMEOUT,
        attempt_timeout: float | None = None,
        auth_token: str | AsyncTokenProvider | None = None,
        token_ttl: float | None = None,
        signing_key: bytes | str | None = None,
        signing_key_id: str | None = None,
        headers: Headers | None = None,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = make_settings(
            base_url, max_retries, retry_delay, timeout, attempt_timeout,
            headers, signing_key, signing_key_id,
        )  # fmt: skip
        self._token = AsyncToken(auth_token, token_ttl, clock) if auth_token is not None else None
        # trust_env=False: see OpusClient (HTTP_PROXY may point at the sidecar itself).
        self._http = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            trust_env=False,
        )
        self._closed = False

    @property
    def base_url(self) -> str:
        return str(self._settings.base_url)

    async def call_service(
        self,
        service: str,
        method: str,
        body: Any = None,
        timeout: float | None = None,
        headers: Headers | None = None,
        *,
        idempotent: bool = False,
    ) -> Response:
        """See `OpusClient.call_service`."""
        if self._closed:
            raise ClientClosedError("the client is closed")
        prepared = PreparedCall(
            self._settings, service, method, body, headers, timeout, idempotent, time.monotonic()
        )
        steps = call_steps(prepared, self._http.build_request, lambda: self._closed)
        outcome: Outcome = None
        while True:
            step = advance(steps, outcome)
            if isinstance(step, Response):
                return step
            if isinstance(step, Wait):
                outcome = None
                await asyncio.sleep(step.delay)
                continue
            token = await self._token.get() if self._token is not None else None
            try:
                # httpx bounds each read and write; this bounds the attempt as a whole.
                async with asyncio.timeout(step.timeout):
                    outcome = await self._http.send(step.request(token))
            except (TimeoutError, httpx.TransportError) as exc:
                outcome = exc

    async def aclose(self) -> None:
        self._closed = True
        await self._http.aclose()

    async def __aenter__(self) -> AsyncOpusClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
