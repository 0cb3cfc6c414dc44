"""One call as the filters see it (`Call`), the replies a filter makes, and the body
buffering every filter shares (limits, the sidecar-wide budget).

What the router and the proxy record on a call (the endpoints tried, the outcome, the
access log's flags, the buffer budget) is theirs: filters read it through properties, and
change it only through the few methods meant for them (`record_error`, `begin_try`,
`set_flags`, `note_local_reply`). The sidecar's own modules (chain, proxy, callbacks,
tracing) read and write the private slots behind the properties directly, so the
per-call path costs one slot access per field, as it did when the fields were public.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sidecar.errors import MeshError, error_response
from sidecar.messages import Body, Headers, Request, Response, fixed_body

if TYPE_CHECKING:
    from sidecar.cluster import Cluster
    from sidecar.discovery.base import Endpoint


class BodyTooLarge(MeshError):
    status = 413
    flag = "BL"  # body over the buffering limit


class BufferBudgetExhausted(MeshError):
    status = 503
    flag = "BB"  # the sidecar-wide budget for buffered request bodies is in use


class BufferBudget:
    """The request body bytes every call together may hold buffered in this process
    (filters.max_buffered_request_bytes): a call takes as it buffers and gives all of it
    back when it ends, however it ends (CallHandler.complete)."""

    __slots__ = ("capacity", "refusals", "used")

    def __init__(self, capacity: int, refusals: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.refusals = refusals  # counts each refusal (a metric)

    def take(self, size: int) -> bool:
        if self.used + size > self.capacity:
            if self.refusals is not None:
                self.refusals()
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class Call:
    """One call as the filters see it: the request, where it is going, and what happened.

    Filters may change `request`, `authority`, `path`, `deadline`, `retryable` and
    `attrs`; the rest is read-only to them (see the module docstring).
    """

    __slots__ = (
        "_budget",
        "_buffered",
        "_cluster",
        "_endpoint",
        "_error",
        "_flags",
        "_local_reply_by",
        "_route",
        "_tried_endpoints",
        "_tries",
        "_upstream_protocol",
        "attrs",
        "authority",
        "deadline",
        "direction",
        "max_body_bytes",
        "path",
        "request",
        "retryable",
        "service",
    )

    def __init__(
        self,
        request: Request,
        direction: str,
        service: str,
        authority: bytes,
        path: bytes,
        max_body_bytes: int,
    ) -> None:
        self.request = request
        self.direction = direction
        self.service = service
        self.authority = authority  # what the upstream will see as Host / :authority
        self.path = path  # the path (and query) the upstream will see
        self.max_body_bytes = max_body_bytes
        self.attrs: dict[str, Any] = {}  # scratch space filters share on one call
        self.deadline: float | None = None  # time.monotonic() by which the call must end
        self.retryable = False  # a filter (or the caller) marked a non-idempotent call safe
        self._budget: BufferBudget | None = None  # the handler's, shared by every call
        self._buffered = 0  # request body bytes this call holds of the budget
        self._endpoint: Endpoint | None = None
        self._cluster: Cluster | None = None
        self._tried_endpoints: list[Endpoint] = []
        self._tries = 0
        self._upstream_protocol = ""
        self._error: MeshError | None = None
        self._flags = "-"
        self._local_reply_by = ""
        self._route = "-"

    # -- what the router and the proxy recorded (read-only to filters) --------------------

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint of the last try that got a response head."""
        return self._endpoint

    @property
    def cluster(self) -> Cluster | None:
        """The cluster that endpoint belongs to."""
        return self._cluster

    @property
    def tried(self) -> tuple[Endpoint, ...]:
        """The endpoints tried so far, oldest first (a retry prefers others)."""
        return tuple(self._tried_endpoints)

    @property
    def tries(self) -> int:
        """How many times the router sent the call."""
        return self._tries

    @property
    def upstream_protocol(self) -> str:
        """h2c or http1, once sent."""
        return self._upstream_protocol

    @property
    def error(self) -> MeshError | None:
        """The mesh's own failure of the call (or of its latest try), when there was one."""
        return self._error

    @property
    def flags(self) -> str:
        """The access log's response flags ("-": none)."""
        return self._flags

    @property
    def local_reply_by(self) -> str:
        """The filter that answered the call itself, if one did."""
        return self._local_reply_by

    @property
    def route(self) -> str:
        """How the call was routed (invoke, host, proxy, a route's match)."""
        return self._route

    @property
    def buffered(self) -> int:
        """Request body bytes this call holds of the sidecar's buffer budget."""
        return self._buffered

    # -- what a filter may record ------------------------------------------------------

    def record_error(self, error: MeshError) -> None:
        """The mesh failed the call (or this try) with `error`: it becomes `error`, and
        its flag the access log's. `error_reply` records and renders in one step."""
        self._error = error
        self._flags = error.flag

    def begin_try(self) -> None:
        """Forget the last try's outcome before sending the call again (a retry):
        `error` and `flags` then describe the latest try only."""
        self._error = None
        self._flags = "-"

    def set_flags(self, flags: str) -> None:
        """Set the access log's response flags (e.g. URX: retries exhausted)."""
        self._flags = flags

    def note_local_reply(self, by: str) -> None:
        """The filter named `by` answered the call itself. `Filter.handle` notes this for
        an `on_request` reply; a filter that overrides `handle` notes its own."""
        self._local_reply_by = by

    # -- the request ---------------------------------------------------------------------

    @property
    def headers(self) -> Headers:
        return self.request.headers

    def header(self, name: bytes) -> bytes | None:
        return self.request.header(name)

    def set_header(self, name: bytes, value: bytes) -> None:
        _set(self.request.headers, name, value)

    def remove_header(self, name: bytes) -> None:
        self.request.headers[:] = [(n, v) for n, v in self.request.headers if n != name]

    async def read_body(self, limit: int | None = None) -> bytes:
        """Buffer the whole request body (then it can be read again and resent).

        Over `limit` (default: filters.max_body_bytes) the call is answered 413.
        """
        cap = self.max_body_bytes if limit is None else limit
        body = self.request.body
        whole = body.buffered_whole
        if whole is not None and len(whole) <= cap:
            return whole
        data = await read_whole(body, cap, "request", self)
        self.request.body = fixed_body(data)
        return data

    def hold(self, size: int) -> None:
        """Count `size` more buffered request bytes against the budget, or refuse (503)."""
        budget = self._budget
        if budget is None:
            return
        if not budget.take(size):
            self.request.body.cancel()
            raise BufferBudgetExhausted(
                f"request body refused: the sidecar's buffer budget "
                f"(filters.max_buffered_request_bytes = {budget.capacity}) is in use",
                service=self.service,
            )
        self._buffered += size

    def release(self) -> None:
        """The call is over: give its buffered bytes back to the budget."""
        if self._buffered and self._budget is not None:
            self._budget.give(self._buffered)
        self._buffered = 0

    def set_body(self, data: bytes) -> None:
        self.request.body = fixed_body(data)
        _set(self.request.headers, b"content-length", str(len(data)).encode())

    def reply(self, status: int, body: bytes = b"", headers: Headers | None = None) -> Response:
        """A local reply; returning it from a filter answers the call without the upstream."""
        return reply(status, body, headers)


Next = Callable[[Call], Awaitable[Response]]


def reply(status: int, body: bytes = b"", headers: Headers | None = None) -> Response:
    """A local reply: returned from a filter, it answers the call without the upstream.
    A body gets its content-length unless `headers` already carry one."""
    out: Headers = list(headers or ())
    if body and not any(n == b"content-length" for n, _ in out):
        out.append((b"content-length", str(len(body)).encode()))
    return Response(status, out, fixed_body(body))


def error_reply(call: Call, error: MeshError) -> Response:
    """Answer `call` with the mesh's rendering of `error` (JSON, or gRPC status headers
    for a gRPC call), recording it on the call as the router would. Raising the error
    from a filter gives the same reply; this is for a filter that adds to it."""
    call._error = error
    call._flags = error.flag
    return error_response(error, grpc=call.request.is_grpc)


async def read_whole(body: Body, limit: int, what: str, holder: Call | None = None) -> bytes:
    """The whole body; a request's bytes are held against the budget via `holder`."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await body.read()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            body.cancel()
            raise BodyTooLarge(f"{what} body over the {limit}-byte buffering limit", status=413)
        if holder is not None:
            holder.hold(len(chunk))
        parts.append(chunk)


async def read_response_body(response: Response, limit: int) -> bytes:
    """Buffer a response body whole (for filters that need it), keeping it readable."""
    data = await read_whole(response.body, limit, "response")
    response.body = fixed_body(data, response.body.trailers)
    return data


def _set(headers: Headers, name: bytes, value: bytes) -> None:
    for i, (n, _) in enumerate(headers):
        if n == name:
            headers[i] = (name, value)
            del_rest = [j for j in range(i + 1, len(headers)) if headers[j][0] == name]
            for j in reversed(del_rest):
                del headers[j]
            return
    headers.append((name, value))


def set_response_header(response: Response, name: bytes, value: bytes) -> None:
    """Set `name` on the response, replacing every earlier value."""
    _set(response.headers, name, value)
