"""Deadlines as they travel with a call: the headers that carry them between hops
(`x-opus-deadline-ms` between sidecars, gRPC's own `grpc-timeout`), and reading them.

A deadline is a `time.monotonic()` instant (`Call.deadline`); on the wire it is the time
left, which the router refreshes on every try.
"""

from __future__ import annotations

import math
import time

from sidecar.messages import FIELD_NAME, Request

DEADLINE_HEADER = b"x-opus-deadline-ms"
GRPC_TIMEOUT_HEADER = b"grpc-timeout"
_DEADLINE_FIELDS = frozenset({GRPC_TIMEOUT_HEADER, DEADLINE_HEADER})

_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_GRPC_MAX_DIGITS = 8  # grpc-timeout's TimeoutValue (PROTOCOL-HTTP2.md)


def parse_grpc_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (PROTOCOL-HTTP2.md: 1-8 digits and a unit) in seconds, else None."""
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > _GRPC_MAX_DIGITS:
        return None
    return int(digits) * unit


def format_grpc_timeout(seconds: float) -> bytes:
    """The grpc-timeout value for `seconds`, in milliseconds while they fit 8 digits."""
    # Rounded to the microsecond first, so float noise (0.7000000001 s) is not a whole ms more.
    ms = max(math.ceil(round(seconds * 1000, 3)), 0)
    if ms < 10**_GRPC_MAX_DIGITS:
        return b"%dm" % ms
    return b"%dS" % min(math.ceil(seconds), 10**_GRPC_MAX_DIGITS - 1)


def caller_deadline(request: Request) -> float | None:
    """The deadline the caller set (gRPC's grpc-timeout, or a peer sidecar's
    x-opus-deadline-ms), as a time.monotonic() value."""
    headers = request.headers
    if _DEADLINE_FIELDS.isdisjoint(map(FIELD_NAME, headers)):
        return None  # the usual call: found without a loop over its fields
    seconds: float | None = None
    for name, value in headers:
        if name == b"grpc-timeout":
            seconds = parse_grpc_timeout(value)
        elif name == DEADLINE_HEADER and value.isdigit():
            seconds = int(value) / 1000
    return None if seconds is None else time.monotonic() + seconds
