"""The ABI as data: header-map serialization with cpp-host's limits, and properties."""

from __future__ import annotations

import struct

import pytest

from filters.wasm.abi import MAX_PAIRS, PairsError, decode_pairs, encode_pairs
from filters.wasm.metrics import PluginMetrics, prometheus_name
from filters.wasm.runtime import SharedData


def test_pairs_round_trip_in_the_documented_layout() -> None:
    pairs = [(b"a", b"1"), (b"bb", b"22")]
    raw = encode_pairs(pairs)
    # u32 N | N x (u32 key_len, u32 value_len) | key\0value\0...
    assert raw == struct.pack("<IIIII", 2, 1, 1, 2, 2) + b"a\x001\x00bb\x0022\x00"
    assert decode_pairs(raw) == pairs


def test_an_empty_map_is_empty_bytes_and_decodes_from_zero_or_one_byte() -> None:
    assert encode_pairs([]) == b""
    assert decode_pairs(b"") == []
    assert decode_pairs(b"\0") == []


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (struct.pack("<III", 1, 1, 1) + b"a\x001", "NUL"),  # value not terminated
        (struct.pack("<III", 1, 1, 1) + b"a\x001\x00extra", "trailing"),
        (struct.pack("<I", 1), "truncated"),
        (struct.pack("<I", MAX_PAIRS + 1) + b"\0" * 8 * (MAX_PAIRS + 1), "limit"),
    ],
)
def test_malformed_maps_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(PairsError, match=why):
        decode_pairs(raw)


def test_shared_data_compare_and_swap() -> None:
    shared = SharedData()
    assert shared.get("vm", b"k") is None
    assert shared.set("vm", b"k", b"v1", 0)
    value, cas = shared.get("vm", b"k") or (b"", 0)
    assert value == b"v1"
    assert not shared.set("vm", b"k", b"v2", cas + 5)  # stale CAS
    assert shared.set("vm", b"k", b"v2", cas)
    assert shared.get("vm", b"k") == (b"v2", cas + 1)
    assert shared.get("other-vm", b"k") is None  # scoped by vm_id


def test_shared_queue_notifies_its_owner() -> None:
    shared = SharedData()
    ready: list[int] = []
    qid = shared.register_queue("vm", b"jobs", ready.append)
    assert shared.resolve_queue("vm", b"jobs") == qid
    assert shared.dequeue(qid) is None
    assert shared.enqueue(qid, b"one")
    assert ready == [qid]
    assert shared.dequeue(qid) == b"one"
    with pytest.raises(KeyError):
        shared.dequeue(qid + 100)


def test_guest_metrics_keep_ids_per_name_and_type() -> None:
    metrics = PluginMetrics("f")
    counter = metrics.define(0, "calls")
    assert metrics.define(0, "calls") == counter
    gauge = metrics.define(1, "calls")
    assert gauge != counter
    assert metrics.increment(counter, 3) and metrics.increment(counter, 2)
    assert metrics.get(counter) == 5
    assert metrics.record(gauge, 42) and metrics.get(gauge) == 42
    assert not metrics.increment(999, 1)
    assert prometheus_name("my.metric-name") == "my_metric_name"
    assert prometheus_name("9lives") == "_9lives"
