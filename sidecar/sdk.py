"""The filter SDK: everything a filter is written against, in one module.

A filter package (the built-in ones in `filters/` included) imports from here and nowhere
else in `sidecar`; what is not listed in `__all__` may change without notice. The guide,
with a complete example package, is docs/filters/sdk.md.

- Writing a filter: `Filter` (override `on_request` / `on_response`, or `handle` to wrap
  the rest of the chain, which is `Next`), made by a `FilterFactory` from its config
  dataclass and a `FilterContext` (direction, local service, `clock`, `metrics`).
- The call: `Call` (the request and where it goes; the router's record of it read-only),
  `Request`, `Response`, `Headers`, `Body`, `fixed_body`.
- Answering: `reply` (a local reply), `error_reply` (the mesh's rendering of an error),
  `set_response_header`, `read_response_body`.
- Errors a filter raises (rendered for it: status, JSON or gRPC status, access-log flag):
  `MeshError` and its kinds; those it reads on `call.error` after the router ran.
- Metrics: `FilterMetrics`, the type of `FilterContext.metrics`.
- Deadlines (`call.deadline` is a `time.monotonic()` instant): the headers that carry
  them between hops and their parsing and formatting.
- `signing`: the seed's HMAC request-signature wire format, which the client library
  (opus_client) shares with the hmac_sign and hmac_verify filters.
"""

from __future__ import annotations

from sidecar import signing
from sidecar.call import (
    BodyTooLarge,
    BufferBudgetExhausted,
    Call,
    Next,
    error_reply,
    read_response_body,
    reply,
    set_response_header,
)
from sidecar.chain import Filter, FilterContext, FilterFactory, FilterFailed
from sidecar.deadline import (
    DEADLINE_HEADER,
    GRPC_TIMEOUT_HEADER,
    caller_deadline,
    format_grpc_timeout,
    parse_grpc_timeout,
)
from sidecar.discovery.base import Endpoint
from sidecar.errors import (
    MeshError,
    StreamRefused,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.filtermetrics import FilterMetrics
from sidecar.messages import Body, BodyError, Headers, Request, Response, fixed_body

__all__ = [
    "DEADLINE_HEADER",
    "GRPC_TIMEOUT_HEADER",
    "Body",
    "BodyError",
    "BodyTooLarge",
    "BufferBudgetExhausted",
    "Call",
    "Endpoint",
    "Filter",
    "FilterContext",
    "FilterFactory",
    "FilterFailed",
    "FilterMetrics",
    "Headers",
    "MeshError",
    "Next",
    "Request",
    "Response",
    "StreamRefused",
    "UpstreamConnectError",
    "UpstreamReset",
    "UpstreamTimeout",
    "caller_deadline",
    "error_reply",
    "fixed_body",
    "format_grpc_timeout",
    "parse_grpc_timeout",
    "read_response_body",
    "reply",
    "set_response_header",
    "signing",
]
