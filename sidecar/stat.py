"""`opus-sidecar stat`: a live table of each service's traffic, read from a sidecar's
admin port (the way `linkerd viz stat` shows a mesh).

Two snapshots of /stats an interval apart give, per direction and service: request
rate, success rate (non-5xx, and gRPC OK where gRPC), and latency percentiles
estimated from the duration histogram's buckets (as Prometheus's histogram_quantile
does: linear within the bucket).
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, TextIO

Stats = dict[str, list[dict[str, Any]]]
_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Row:
    direction: str
    service: str
    rps: float
    success: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    total: int


def fetch(admin: str, timeout: float = 5.0) -> Stats:
    url = admin.rstrip("/") + "/stats?filter=opus_request"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data: Stats = json.load(resp)
    return data


def _counts(stats: Stats) -> tuple[dict[_Key, float], dict[_Key, float]]:
    total: dict[_Key, float] = defaultdict(float)
    ok: dict[_Key, float] = defaultdict(float)
    for sample in stats.get("opus_requests_total", []):
        labels = sample["labels"]
        key = (labels["direction"], labels["service"])
        total[key] += sample["value"]
        code = labels.get("code", "")
        grpc = labels.get("grpc_status", "")
        if code and not code.startswith("5") and code != "0" and grpc in ("", "0"):
            ok[key] += sample["value"]
    return total, ok


def _buckets(stats: Stats) -> dict[_Key, list[tuple[float, float]]]:
    out: dict[_Key, list[tuple[float, float]]] = defaultdict(list)
    for sample in stats.get("opus_request_duration_seconds_bucket", []):
        labels = sample["labels"]
        out[(labels["direction"], labels["service"])].append((float(labels["le"]), sample["value"]))
    for series in out.values():
        series.sort()
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over cumulative (upper bound, count) pairs, +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def rows(before: Stats, after: Stats, seconds: float) -> list[Row]:
    total0, ok0 = _counts(before)
    total1, ok1 = _counts(after)
    buckets0, buckets1 = _buckets(before), _buckets(after)
    out: list[Row] = []
    for key in sorted(total1):
        calls = total1[key] - total0.get(key, 0.0)
        good = ok1.get(key, 0.0) - ok0.get(key, 0.0)
        old = dict(buckets0.get(key, []))
        delta = [(le, n - old.get(le, 0.0)) for le, n in buckets1.get(key, [])]
        out.append(
            Row(
                direction=key[0],
                service=key[1],
                rps=calls / seconds if seconds > 0 else 0.0,
                success=good / calls if calls > 0 else None,
                p50=quantile(0.50, delta),
                p95=quantile(0.95, delta),
                p99=quantile(0.99, delta),
                total=int(total1[key]),
            )
        )
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}ms"


def render(table: list[Row], admin: str, seconds: float) -> str:
    header = ("DIRECTION", "SERVICE", "RPS", "SUCCESS", "P50", "P95", "P99", "TOTAL")
    lines = [header] + [
        (
            r.direction,
            r.service,
            f"{r.rps:.1f}",
            "-" if r.success is None else f"{r.success * 100:.2f}%",
            _ms(r.p50),
            _ms(r.p95),
            _ms(r.p99),
            str(r.total),
        )
        for r in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"{admin}  (last {seconds:.1f}s)"]
    text += [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    ]
    if not table:
        text.append("(no calls yet)")
    return "\n".join(text) + "\n"


def run(admin: str, interval: float, once: bool, out: TextIO = sys.stdout) -> int:
    try:
        before = fetch(admin)
    except OSError as exc:
        print(f"opus-sidecar stat: cannot read {admin}/stats: {exc}", file=sys.stderr)
        return 1
    taken = time.monotonic()
    try:
        while True:
            time.sleep(interval)
            after = fetch(admin)
            now = time.monotonic()
            text = render(rows(before, after, now - taken), admin, now - taken)
            if once:
                out.write(text)
                return 0
            out.write("\x1b[H\x1b[2J" + text)  # clear the screen, then redraw
            out.flush()
            before, taken = after, now
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"opus-sidecar stat: lost {admin}: {exc}", file=sys.stderr)
        return 1
