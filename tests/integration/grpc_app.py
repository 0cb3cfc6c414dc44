"""A real gRPC server (grpcio) for integration tests, with raw-bytes messages so no
generated code is needed. Service `test.Echo`:

- Unary: echoes the request; metadata `x-fail: CODE` aborts with that status code;
  `x-sleep-ms` sleeps first; echoes `x-meta` and `x-meta-bin` back in trailing metadata.
- ServerStream: replies with N (= int of the request) messages of 1 KiB.
- ClientStream: replies with the total byte count of the stream as ASCII.
- Bidi: echoes each message as it arrives.
- Wait: blocks until cancelled, recording the cancellation (GET /cancelled on the
  admin HTTP port reports the count).

Run: `python -m tests.integration.grpc_app --ports-file F`; writes {"port": N, "admin": M}.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

cancelled = {"count": 0}


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    meta = dict(context.invocation_metadata())
    if "x-sleep-ms" in meta:
        time.sleep(int(meta["x-sleep-ms"]) / 1000)
    trailing = []
    if "x-meta" in meta:
        trailing.append(("x-meta", meta["x-meta"]))
    if "x-meta-bin" in meta:
        trailing.append(("x-meta-bin", meta["x-meta-bin"]))
    context.set_trailing_metadata(trailing)
    if "x-fail" in meta:
        code = grpc.StatusCode[meta["x-fail"]]
        context.abort(code, f"failing as asked: {code.name} ünïcode")
    return request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield bytes([i % 256]) * 1024


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


def _wait(request: bytes, context: grpc.ServicerContext) -> bytes:
    done = threading.Event()

    def on_done() -> None:
        if not context.is_active():
            cancelled["count"] += 1
        done.set()

    context.add_callback(on_done)
    done.wait(30)
    return b"late"


class _Admin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(cancelled).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports-file", required=True)
    args = parser.parse_args()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "Wait": grpc.unary_unary_rpc_method_handler(_wait),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    admin = ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    tmp = args.ports_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": port, "admin": admin.server_address[1]}, fh)
    os.replace(tmp, args.ports_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
