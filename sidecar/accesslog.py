"""The data path's access log: one JSON object per line, one line per call.

Written straight to a stream rather than through `logging`: a call's record is
already structured, and the logging machinery (records, handlers, locks) would
cost more than the serialisation itself on the hot path. The `sidecar.access`
logger reports only this log's own failures.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

logger = logging.getLogger("sidecar.access")

_SEPARATORS = (",", ":")


class AccessLog:
    """Append-only JSON-lines sink.

    `target` is "-" for standard output, "" to disable, else a file path opened
    for append. A file that cannot be opened raises here, at start, so a bad
    path stops the process before it serves.
    """

    def __init__(self, target: str) -> None:
        self._stream: IO[str] | None
        self._owned = False
        self._failing = False
        if target == "":
            self._stream = None
        elif target == "-":
            self._stream = sys.stdout
        else:
            # Line-buffered: one write(2) per record, and a crash loses at most
            # the record being written.
            self._stream = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owned = True

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, record: dict[str, object]) -> None:
        """Write one record; never raises into the data path."""
        stream = self._stream
        if stream is None:
            return
        # default=str: a stray non-JSON value must not cost the call its log line.
        line = json.dumps(record, separators=_SEPARATORS, default=str) + "\n"
        try:
            stream.write(line)
            # stdout is block-buffered under a container runtime; flush so the
            # line leaves now. On a line-buffered file this is a no-op.
            stream.flush()
        except (OSError, ValueError) as exc:
            # Log once per outage (a full disk would otherwise log per call).
            if not self._failing:
                self._failing = True
                logger.error("access log write failed, dropping records: %s", exc)
            return
        if self._failing:
            self._failing = False
            logger.warning("access log writes recovered")

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and self._owned:
            stream.close()


def _rfc3339_ms(ts: float) -> str:
    secs = int(ts)
    millis = int((ts - secs) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{millis:03d}Z"


def record(
    *,
    start: float,
    direction: str,
    service: str,
    method: str,
    path: str,
    authority: str,
    protocol: str,
    status: int,
    duration_s: float,
    upstream: str,
    bytes_in: int,
    bytes_out: int,
    flags: str,
    trace_id: str = "-",
    route: str = "-",
    grpc_status: str = "",
    tries: int = 0,
) -> dict[str, object]:
    """Build one call's access-log record; `start` is the call's `time.time()`.

    `flags` are short codes for what went wrong, in the spirit of Envoy's response
    flags: NR no route (unknown service), UH no healthy upstream, UF upstream connect
    failure, UR refused stream, UC upstream reset/closed, UO pool or breaker overflow,
    UT timeout, URX retries exhausted, RL rate-limited, CO circuit open, AUTH signature
    refused, BL body over the buffering limit, FE filter failed, DC downstream (the
    caller) went away, DPE downstream protocol error, LR local reply; a local reply by a
    filter reads `FLAG:filter`.
    """
    return {
        "time": _rfc3339_ms(start),
        "trace_id": trace_id,
        "direction": direction,
        "service": service,
        "route": route,
        "method": method,
        "path": path,
        "authority": authority,
        "protocol": protocol,
        "status": status,
        "grpc_status": grpc_status,
        "duration_ms": round(duration_s * 1000.0, 3),
        "upstream": upstream,
        "tries": tries,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "flags": flags,
    }
