"""The seed's JSON-versus-Protobuf comparison: 1 KiB calls through the mesh with
opus_client, the same data as JSON and as a protobuf message built at runtime
from a descriptor built in code, so no protoc). The upstream nginx returns the same data in the
same encoding, so each call encodes a request and decodes a reply.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from opus_client import OpusClient


def _order_type() -> type[Message]:
    """`message Order { string order_id = 1; string customer = 2; string currency = 3;
    repeated Item items = 4; }`, `message Item { string sku = 1; string name = 2;
    int32 qty = 3; double price = 4; }`, built as a descriptor at runtime."""
    fd = descriptor_pb2.FileDescriptorProto(name="bench_order.proto", package="bench")
    F = descriptor_pb2.FieldDescriptorProto
    item = fd.message_type.add(name="Item")
    for number, (name, kind) in enumerate(
        (
            ("sku", F.TYPE_STRING),
            ("name", F.TYPE_STRING),
            ("qty", F.TYPE_INT32),
            ("price", F.TYPE_DOUBLE),
        ),
        1,
    ):
        item.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
    order = fd.message_type.add(name="Order")
    for number, name in enumerate(("order_id", "customer", "currency"), 1):
        order.field.add(name=name, number=number, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    order.field.add(
        name="items", number=4, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".bench.Item"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    cls: type[Message] = message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Order"))
    return cls


Order = _order_type()


def _message(data: dict[str, Any]) -> Message:
    return json_format.ParseDict(data, Order())


def payload() -> dict[str, Any]:
    """About 1 KiB as compact JSON: an order with 15 line items."""
    items = [
        {"sku": f"SKU-{i:05d}", "name": f"widget model {i}", "qty": i % 7 + 1, "price": 9.5 + i}
        for i in range(15)
    ]
    return {
        "order_id": "ord-7f3a9c2e",
        "customer": "cust-001234",
        "currency": "EUR",
        "items": items,
    }


def write_files(docroot: Path) -> tuple[int, int]:
    data = payload()
    as_json = json.dumps(data, separators=(",", ":")).encode()
    as_proto = _message(data).SerializeToString()
    (docroot / "payload.json").write_bytes(as_json)
    (docroot / "payload.pb").write_bytes(as_proto)
    return len(as_json), len(as_proto)


def _encode_decode_us(rounds: int) -> dict[str, float]:
    """Encode the request and decode the reply in-process: the codec cost alone."""
    data = payload()
    as_json = json.dumps(data, separators=(",", ":")).encode()
    message = _message(data)
    as_proto = message.SerializeToString()
    out = {}
    t = time.perf_counter()
    for _ in range(rounds):
        json.dumps(data, separators=(",", ":")).encode()
        json.loads(as_json)
    out["json"] = (time.perf_counter() - t) / rounds * 1e6
    t = time.perf_counter()
    for _ in range(rounds):
        # An app holds its data as the message already: encoding is SerializeToString.
        message.SerializeToString()
        Order().ParseFromString(as_proto)
    out["protobuf"] = (time.perf_counter() - t) / rounds * 1e6
    return out


def run(base_url: str, service: str, calls: int) -> dict[str, dict[str, float]]:
    """`calls` calls of each kind, alternating in blocks of 50 so drift hits both alike."""
    data = payload()
    message = _message(data)
    latencies: dict[str, list[float]] = {"json": [], "protobuf": []}
    cpu = {"json": 0.0, "protobuf": 0.0}
    sizes = {"json": 0, "protobuf": 0}
    with OpusClient(base_url=base_url, max_retries=0) as client:
        for block in range(max(1, calls // 50)):
            for kind in ("json", "protobuf") if block % 2 == 0 else ("protobuf", "json"):
                for _ in range(min(50, calls)):
                    c0, t0 = time.process_time(), time.perf_counter()
                    if kind == "json":
                        reply = client.call_service(service, "files/payload.json", body=data)
                        decoded: Any = reply.json()
                    else:
                        reply = client.call_service(service, "files/payload.pb", body=message)
                        decoded = reply.protobuf(Order)
                    latencies[kind].append(time.perf_counter() - t0)
                    cpu[kind] += time.process_time() - c0
                    sizes[kind] = len(reply.content)
                    assert decoded, "empty reply"
    codec = _encode_decode_us(2000)
    out: dict[str, dict[str, float]] = {}
    for kind, values in latencies.items():
        values.sort()
        out[kind] = {
            "calls": float(len(values)),
            "bytes": float(sizes[kind]),
            "mean_us": statistics.fmean(values) * 1e6,
            "p50_us": values[len(values) // 2] * 1e6,
            "p99_us": values[min(len(values) - 1, int(len(values) * 0.99))] * 1e6,
            "client_cpu_us": cpu[kind] / len(values) * 1e6,
            "codec_us": codec[kind],
        }
    return out
