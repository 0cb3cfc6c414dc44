"""`OpusClient`: the blocking client. `call_service()` calls a service through the
local sidecar; `call_service_async()` runs the same call on a worker thread and
returns a `concurrent.futures.Future` (the seed's Go `AsyncCall`).

One `httpx.Client` per OpusClient holds the connection pool: every call, from any
thread, future or not, reuses its keep-alive connections to the sidecar.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import httpx

from opus_client._call import DEFAULT_TIMEOUT, Headers, PreparedCall, make_settings
from opus_client._steps import Outcome, Wait, advance, call_steps
from opus_client.auth import Token, TokenProvider
from opus_client.exceptions import ClientClosedError
from opus_client.response import Response


class OpusClient:
    """A client of the services in the mesh, through the local sidecar at `base_url`.

    base_url: the sidecar's outbound listener; default $OPUS_SIDECAR_URL, else
        http://localhost:8080.
    max_retries, retry_delay: resends of a failed call, the n-th after about
        retry_delay * 2**(n-1) seconds (+-50% jitter); what is resent: docs/client.md.
    timeout: the default deadline of a call, in seconds, covering every attempt and
        wait (None: none); call_service(timeout=...) overrides it per call.
    attempt_timeout: a bound on each single attempt within the deadline (None: none).
    auth_token: sent as `Authorization: Bearer ...`; a string, or a callable returning
        a fresh token, called again before `token_ttl` seconds run out.
    signing_key, signing_key_id: sign each call with the seed's HMAC scheme.
    headers: sent on every call (a call's own headers win).
    max_connections: the pool's size; max_workers: threads for call_service_async.
    transport: an httpx transport in place of the network (tests).
    clock: the monotonic clock token renewal reads (tests inject one).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        max_retries: int = 3,
        retry_delay: float = 0.5,
        timeout: float | None = DEFAULT_TIMEOUT,
        attempt_timeout: float | None = None,
        auth_token: str | TokenProvider | None = None,
        token_ttl: float | None = None,
        signing_key: bytes | str | None = None,
        signing_key_id: str | None = None,
        headers: Headers | None = None,
        max_connections: int = 100,
        max_workers: int = 8,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = make_settings(
            base_url, max_retries, retry_delay, timeout, attempt_timeout,
            headers, signing_key, signing_key_id,
        )  # fmt: skip
        self._token = Token(auth_token, token_ttl, clock) if auth_token is not None else None
        # trust_env=False: an app run with HTTP_PROXY pointing at its sidecar must not
        # have these calls to the sidecar sent through that proxy as absolute-form URLs.
        self._http = httpx.Client(
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            trust_env=False,
        )
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[Response]] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def base_url(self) -> str:
        return str(self._settings.base_url)

    def call_service(
        self,
        service: str,
        method: str,
        body: Any = None,
        timeout: float | None = None,
        headers: Headers | None = None,
        *,
        idempotent: bool = False,
    ) -> Response:
        """POST `body` to `service`'s `method` (the sidecar's /v1/invoke/{service}/{method}).

        body: a JSON-serialisable value, bytes, a protobuf message, or None for no body.
        idempotent: the method may safely run twice, so failures after the request went
            out (reset, 502, 504) are resent too, and the mesh is told so.
        Returns a 2xx/3xx reply; raises RetryableError (CallTimeout when the deadline
        passes) or NonRetryableError, both OpusErrors.
        """
        prepared = self._prepare(service, method, body, timeout, headers, idempotent)
        return self._run(prepared, None)

    def call_service_async(
        self,
        service: str,
        method: str,
        body: Any = None,
        timeout: float | None = None,
        headers: Headers | None = None,
        *,
        idempotent: bool = False,
    ) -> Future[Response]:
        """call_service() on a worker thread; the call's deadline starts now.

        `future.cancel()` succeeds until the call has ended: the future is cancelled
        at once and no further attempt or backoff wait happens; an attempt already on
        the wire is abandoned and its reply discarded (it ends within its deadline).
        Because of that, the future stays in the pending state while the call runs.
        """
        prepared = self._prepare(service, method, body, timeout, headers, idempotent)
        future: Future[Response] = Future()
        stop = threading.Event()
        with self._lock:
            if self._closed:
                raise ClientClosedError("the client is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_workers, "opus-client")
            self._pending.add(future)
            executor = self._executor
        future.add_done_callback(lambda f: self._finished(f, stop))

        def work() -> None:
            if future.done():
                return
            try:
                result = self._run(prepared, stop)
            except CancelledError:
                return
            except BaseException as exc:
                with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                    future.set_exception(exc)
            else:
                with contextlib.suppress(InvalidStateError):
                    future.set_result(result)

        executor.submit(work)
        return future

    def close(self) -> None:
        """Cancel calls still pending in futures and close the pooled connections."""
        with self._lock:
            self._closed = True
            pending, self._pending = set(self._pending), set()
            executor, self._executor = self._executor, None
        for future in pending:
            future.cancel()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> OpusClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _prepare(
        self,
        service: str,
        method: str,
        body: Any,
        timeout: float | None,
        headers: Headers | None,
        idempotent: bool,
    ) -> PreparedCall:
        if self._closed:
            raise ClientClosedError("the client is closed")
        return PreparedCall(
            self._settings, service, method, body, headers, timeout, idempotent, time.monotonic()
        )

    def _finished(self, future: Future[Response], stop: threading.Event) -> None:
        if future.cancelled():
            stop.set()
        with self._lock:
            self._pending.discard(future)

    def _run(self, prepared: PreparedCall, stop: threading.Event | None) -> Response:
        steps = call_steps(prepared, self._http.build_request, lambda: self._closed)
        outcome: Outcome = None
        while True:
            if outcome is None and stop is not None and stop.is_set():
                raise CancelledError  # before an attempt, as a Wait's end checks too
            step = advance(steps, outcome)
            if isinstance(step, Response):
                return step
            if isinstance(step, Wait):
                outcome = None
                if stop is None:
                    time.sleep(step.delay)
                elif stop.wait(step.delay):
                    raise CancelledError
                continue
            token = self._token.get() if self._token is not None else None
            try:
                outcome = self._http.send(step.request(token))
            except httpx.TransportError as exc:
                outcome = exc
