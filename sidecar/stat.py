"""`opus-sidecar stat`: a live table of each service's traffic, read from a sidecar's
admin port (the way `linkerd viz stat` shows a mesh).

Two snapshots of /stats an interval apart give, per direction and service: request
rate, success rate (non-5xx, and gRPC OK where gRPC), and latency percentiles
estimated from the duration histogram's buckets (as Prometheus's histogram_quantile
does: linear within the bucket). Below, when there are any: the inbound callers by
their verified mTLS identity (`linkerd viz edges`' question: who calls me), and each
route rule's split between its destinations (a canary's 90/10, live).
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


# The metrics the tables are made of (the /stats filter's prefixes).
_FILTERS = ("opus_request", "opus_tls_peer_requests", "opus_route_requests")


def fetch(admin: str, timeout: float = 5.0) -> Stats:
    query = "&".join(f"filter={name}" for name in _FILTERS)
    url = admin.rstrip("/") + "/stats?" + query
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


@dataclass(frozen=True, slots=True)
class Share:
    """Calls over the interval under some labels, and their share of their group's."""

    labels: tuple[str, ...]
    rps: float
    share: float | None  # of the group's calls in the interval (None: no calls in it)
    total: int


def shares(
    before: Stats, after: Stats, seconds: float, metric: str, names: tuple[str, ...], group: int
) -> list[Share]:
    """`metric`'s series by the label `names`, each with its share of the calls of the
    series whose first `group` labels are its own (a route's destinations: group 1)."""

    def counts(stats: Stats) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for sample in stats.get(metric, []):
            out[tuple(sample["labels"].get(n, "") for n in names)] += sample["value"]
        return out

    old, new = counts(before), counts(after)
    delta = {key: value - old.get(key, 0.0) for key, value in new.items()}
    groups: dict[tuple[str, ...], float] = defaultdict(float)
    for key, calls in delta.items():
        groups[key[:group]] += calls
    return [
        Share(
            labels=key,
            rps=delta[key] / seconds if seconds > 0 else 0.0,
            share=delta[key] / groups[key[:group]] if groups[key[:group]] > 0 else None,
            total=int(new[key]),
        )
        for key in sorted(new)
    ]


def _table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    lines = [header, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    ]


def _share_lines(table: list[Share]) -> list[tuple[str, ...]]:
    return [
        (
            *s.labels,
            f"{s.rps:.1f}",
            "-" if s.share is None else f"{s.share * 100:.1f}%",
            str(s.total),
        )
        for s in table
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}ms"


def render(
    table: list[Row],
    admin: str,
    seconds: float,
    callers: list[Share] | None = None,
    routes: list[Share] | None = None,
) -> str:
    header = ("DIRECTION", "SERVICE", "RPS", "SUCCESS", "P50", "P95", "P99", "TOTAL")
    lines: list[tuple[str, ...]] = [
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
    text = [f"{admin}  (last {seconds:.1f}s)", *_table(header, lines)]
    if not table:
        text.append("(no calls yet)")
    if callers:
        text += ["", *_table(("CALLER (mTLS)", "RPS", "SHARE", "TOTAL"), _share_lines(callers))]
    if routes:
        columns = ("ROUTE", "SERVICE", "SUBSET", "RPS", "SPLIT", "TOTAL")
        text += ["", *_table(columns, _share_lines(routes))]
    return "\n".join(text) + "\n"


def render_all(before: Stats, after: Stats, admin: str, seconds: float) -> str:
    """Every table for the interval between two snapshots."""
    callers = shares(before, after, seconds, "opus_tls_peer_requests_total", ("identity",), 0)
    routes = shares(
        before, after, seconds, "opus_route_requests_total", ("route", "service", "subset"), 1
    )
    return render(rows(before, after, seconds), admin, seconds, callers, routes)


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
            text = render_all(before, after, admin, now - taken)
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
