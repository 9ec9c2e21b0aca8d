"""The vLLM KV-event wire format: msgpack bytes as vLLM, Dynamo and llm-d read them, both event
forms, older and newer producers, malformed payloads refused; Tandem's epoch-carrying topic."""

import msgpack
import pytest

from tandem.kvtransfer.block_hash import hash_block_tokens
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.kvtransfer.kv_event_wire import (
    Encoding,
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


# One fixed batch and its exact bytes in both forms. The map form is byte-identical to what msgspec
# encodes for vLLM's structs, and vLLM's structs decode both forms (checked with msgspec 0.22).
GOLDEN_TS = 1767225600.25
BIG, PARENT = 0xFEDC_BA98_7654_3210, 0x0123_4567_89AB_CDEF  # BIG >= 2**63: a u64 on the wire
GOLDEN_EVENTS: tuple[KVEvent, ...] = (
    BlockStored((BIG, 7), PARENT, (1, 2, 3, 127, 128, 255, 65535, 65536), 4),
    BlockRemoved((BIG,)),
    AllBlocksCleared(),
)
_HEAD = b"\x93\xcb\x41\xda\x55\x6e\x40\x10\x00\x00"  # fixarray(3), float64 ts
_BIG = b"\xcf\xfe\xdc\xba\x98\x76\x54\x32\x10"  # uint64
_PARENT = b"\xcf\x01\x23\x45\x67\x89\xab\xcd\xef"  # uint64 too: above 2**32
_TOKENS = b"\x98\x01\x02\x03\x7f\xcc\x80\xcc\xff\xcd\xff\xff\xce\x00\x01\x00\x00"  # fixint, uint8/16/32
GOLDEN_MAP = (
    _HEAD + b"\x93"  # 3 events
    + b"\x88\xa4type\xabBlockStored\xacblock_hashes\x92" + _BIG + b"\x07\xb1parent_block_hash" + _PARENT
    + b"\xa9token_ids" + _TOKENS + b"\xaablock_size\x04\xa7lora_id\xc0\xa6medium\xa3GPU\xa9lora_name\xc0"
    + b"\x83\xa4type\xacBlockRemoved\xacblock_hashes\x91" + _BIG + b"\xa6medium\xa3GPU"
    + b"\x81\xa4type\xb0AllBlocksCleared"
    + b"\xc0"  # data_parallel_rank None
)
GOLDEN_ARRAY = (
    _HEAD + b"\x93"
    + b"\x98\xabBlockStored\x92" + _BIG + b"\x07" + _PARENT + _TOKENS + b"\x04\xc0\xa3GPU\xc0"
    + b"\x93\xacBlockRemoved\x91" + _BIG + b"\xa3GPU"
    + b"\x91\xb0AllBlocksCleared"
    + b"\x02"  # data_parallel_rank 2
)


@pytest.mark.parametrize(("encoding", "rank", "golden"), [("map", None, GOLDEN_MAP), ("array", 2, GOLDEN_ARRAY)])
def test_golden_bytes(encoding: Encoding, rank: int | None, golden: bytes) -> None:
    assert encode_event_batch(GOLDEN_TS, GOLDEN_EVENTS, medium="GPU", encoding=encoding,
                              data_parallel_rank=rank) == golden
    assert decode_event_batch(golden) == EventBatch(GOLDEN_TS, GOLDEN_EVENTS, rank)


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
