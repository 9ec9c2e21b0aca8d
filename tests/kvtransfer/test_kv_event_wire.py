"""The vLLM KV-event wire format: msgpack bytes as vLLM, Dynamo and llm-d read them, both event
forms, older and newer producers, malformed payloads refused; Tandem's epoch-carrying topic."""

import msgpack
import pytest

from tandem.kvtransfer.block_hash import hash_block_tokens
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.kvtransfer.kv_event_wire import (
    EventBatch,
    KVEventDecodeError,
    decode_event_batch,
    encode_event_batch,
    kv_event_topic,
    parse_kv_event_topic,
)

H0, H1 = hash_block_tokens(None, [1, 2, 3, 4]), 2**64 - 5  # a real hash and one >= 2**63
STORED = BlockStored((H0, H1), None, (1, 2, 3, 4, 5, 6, 7, 8), 4)
EVENTS: tuple[KVEvent, ...] = (STORED, BlockRemoved((H1,)), AllBlocksCleared())


def test_topic_round_trip_and_rejects() -> None:
    topic = kv_event_topic("ctx-0", 3, "org/model@rev")
    assert topic == "kv@ctx-0#3@org/model@rev"
    assert parse_kv_event_topic(topic) == ("ctx-0", 3, "org/model@rev")
    for bad in ["", "kv@w@m", "kv@w#x@m", "kv@w#1@", "kv@#1@m", "xx@w#1@m", "kv@w#-1@m"]:
        with pytest.raises(ValueError):
            parse_kv_event_topic(bad)
    for args in [("a@b", 0, "m"), ("a#b", 0, "m"), ("", 0, "m"), ("w", -1, "m"), ("w", 0, "")]:
        with pytest.raises(ValueError):
            kv_event_topic(*args)


def test_map_encoding_is_vllm_structure() -> None:
    raw = msgpack.unpackb(encode_event_batch(12.5, EVENTS, medium="GPU"))
    assert raw == [12.5, [
        {"type": "BlockStored", "block_hashes": [H0, H1], "parent_block_hash": None,
         "token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "block_size": 4,
         "lora_id": None, "medium": "GPU", "lora_name": None},  # None fields are sent, as vLLM does
        {"type": "BlockRemoved", "block_hashes": [H1], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ], None]
    assert list(raw[1][0]) == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size",
                               "lora_id", "medium", "lora_name"]  # vLLM's field order
    assert msgpack.unpackb(encode_event_batch(0, [], medium=None, data_parallel_rank=2)) == [0.0, [], 2]
    assert decode_event_batch(encode_event_batch(12.5, EVENTS, medium="GPU")) == EventBatch(12.5, EVENTS)


def test_array_encoding_round_trip() -> None:
    payload = encode_event_batch(1.0, EVENTS, medium="CPU", encoding="array", data_parallel_rank=1)
    assert msgpack.unpackb(payload) == [1.0, [
        ["BlockStored", [H0, H1], None, list(range(1, 9)), 4, None, "CPU", None],
        ["BlockRemoved", [H1], "CPU"],
        ["AllBlocksCleared"],
    ], 1]
    assert decode_event_batch(payload) == EventBatch(1.0, EVENTS, 1)


def test_decode_reads_older_and_newer_producers() -> None:
    old_vllm = msgpack.packb([3, [["BlockStored", [5], 7, [1, 2], 2, None], ["BlockRemoved", [-1]]]])
    old_events = (BlockStored((5,), 7, (1, 2), 2), BlockRemoved((2**64 - 1,)))  # i64 -1 is u64 2**64 - 1
    assert decode_event_batch(old_vllm) == EventBatch(3.0, old_events)
    newer = {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": [1, 2],
             "block_size": 2, "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    decoded = decode_event_batch(msgpack.packb([0.5, [newer], None]))
    assert decoded.events == (BlockStored((5,), None, (1, 2), 2),)


STORED_MAP = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2],
              "block_size": 2}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1.0, [], None]) + b"\x00",  # trailing bytes
        msgpack.packb({"ts": 1.0, "events": []}),
        msgpack.packb([1.0]),
        msgpack.packb([1.0, [], None, 0]),
        msgpack.packb(["now", [], None]),
        msgpack.packb([1.0, {}, None]),
        msgpack.packb([1.0, [], "rank"]),
        msgpack.packb([1.0, [42], None]),
        msgpack.packb([1.0, [[]], None]),
        msgpack.packb([1.0, [["Bogus", [1]]], None]),
        msgpack.packb([1.0, [{"block_hashes": [1]}], None]),  # no type
        msgpack.packb([1.0, [{"type": [1]}], None]),
        msgpack.packb([1.0, [[["BlockRemoved"], [1]]], None]),
        msgpack.packb([1.0, [{**STORED_MAP, "block_hashes": "1"}], None]),
        msgpack.packb([1.0, [{**STORED_MAP, "block_hashes": [True]}], None]),
        msgpack.packb([1.0, [{**STORED_MAP, "block_hashes": [1.5]}], None]),
        msgpack.packb([1.0, [{**STORED_MAP, "parent_block_hash": b"\x01" * 8}], None]),
        msgpack.packb([1.0, [{**STORED_MAP, "token_ids": [1, 2, 3]}], None]),  # not a whole block
        msgpack.packb([1.0, [{**STORED_MAP, "token_ids": [1, -2]}], None]),
        msgpack.packb([1.0, [{**STORED_MAP, "block_size": 0}], None]),
        msgpack.packb([1.0, [{k: v for k, v in STORED_MAP.items() if k != "token_ids"}], None]),
        msgpack.packb([1.0, [["BlockRemoved"]], None]),
    ],
)
def test_decode_rejects_malformed(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError) as info:
        decode_event_batch(payload)
    assert isinstance(info.value, ValueError) and str(info.value)
