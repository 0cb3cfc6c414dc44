"""`python -m bench.h2_engine_bench`: one HTTP/2 request/response exchange (POST 1 KiB in
and out, h2load-like request head, nginx-like response head) between a client and a
server connection in one process, no sockets: the sidecar's engine
(sidecar/proto/h2engine.py) against jh2's and h2's H2Connection, interleaved, medians of
5 rounds. The sidecar runs one server end and one client end per proxied call, so one
exchange here is about one call's HTTP/2 state-machine cost.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

from sidecar.proto import h2engine

BODY = b"x" * 1024
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/bench"),
    (b":authority", b"127.0.0.1:8080"),
    (b"content-length", b"1024"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
RESPONSE = [
    (b":status", b"200"),
    (b"server", b"nginx/1.22.1"),
    (b"date", b"Wed, 25 Nov 2026 02:50:11 GMT"),
    (b"content-type", b"application/octet-stream"),
    (b"content-length", b"1024"),
]


def _pair_ours() -> tuple[Any, Any]:
    settings: dict[int, int] = {h2engine.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
    return (
        h2engine.H2Connection(client_side=True),
        h2engine.H2Connection(client_side=False, settings=settings),
    )


def _pair_library(name: str) -> Callable[[], tuple[Any, Any]]:
    def make() -> tuple[Any, Any]:
        connection = importlib.import_module(f"{name}.connection")
        config = importlib.import_module(f"{name}.config")

        def one(client_side: bool) -> Any:
            cfg = config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
            return connection.H2Connection(config=cfg)

        return one(True), one(False)

    return make


def _exchanges(make: Callable[[], tuple[Any, Any]], calls: int) -> float:
    """Microseconds per exchange over `calls` exchanges on one connection."""
    client, server = make()
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    started = time.perf_counter()
    for _ in range(calls):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST)
        client.send_data(sid, BODY, end_stream=True)
        server.receive_data(client.data_to_send())
        server.acknowledge_received_data(len(BODY), sid)
        server.send_headers(sid, RESPONSE)
        server.send_data(sid, BODY, end_stream=True)
        client.receive_data(server.data_to_send())
        client.acknowledge_received_data(len(BODY), sid)
        server.receive_data(client.data_to_send())
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.h2_engine_bench", description=__doc__)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    engines: dict[str, Callable[[], tuple[Any, Any]]] = {"opus h2engine": _pair_ours}
    for name in ("jh2", "h2"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        engines[name] = _pair_library(name)
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, make in engines.items():
            samples[name].append(_exchanges(make, args.calls))
    ours = statistics.median(samples["opus h2engine"])
    print(f"one exchange (both ends), {args.calls} calls x {args.rounds} rounds, median [min..max]")
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"  {name:14} {median:7.1f} us [{min(values):.1f}..{max(values):.1f}]"
            f"  {median / ours:4.1f}x ours"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
