"""The vLLM KV-events wire format: msgpack ``[ts, [event, ...], data_parallel_rank]`` batches of
tagged map events (vLLM >= #42892) or tagged array events (legacy readers), and Tandem's topic
``kv@<worker id>#<epoch>@<model>``. Pure encoding and decoding, no sockets."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import msgpack

from tandem.kvtransfer.block_hash import BlockHash
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

Encoding: TypeAlias = Literal["map", "array"]

# vLLM's field order: the array form's positions after the tag, and the map keys we send.
_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")
_FIELDS = {"BlockStored": _STORED, "BlockRemoved": ("block_hashes", "medium"), "AllBlocksCleared": ()}


class KVEventDecodeError(ValueError):
    """A payload or frame that is not a valid vLLM KV-event batch."""


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One decoded payload. Wire-only fields (medium, lora_name) are not kept."""

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


def kv_event_topic(worker_id: str, epoch: int, model_name: str) -> str:
    """``kv@<worker>#<epoch>@<model>``: llm-d's ``kv@`` prefix; the epoch lets a reader drop a dead
    incarnation's stream (whose seq restarts at 0) instead of treating it as duplicates."""
    if not worker_id or "@" in worker_id or "#" in worker_id or epoch < 0 or not model_name:
        raise ValueError(f"bad topic parts (no '@'/'#' in the id): {worker_id!r}, {epoch}, {model_name!r}")
    return f"kv@{worker_id}#{epoch}@{model_name}"


def parse_kv_event_topic(topic: str) -> tuple[str, int, str]:
    """(worker_id, epoch, model_name) of a topic built by :func:`kv_event_topic`."""
    prefix, _, rest = topic.partition("@")
    worker_id, _, tail = rest.partition("#")
    epoch, _, model_name = tail.partition("@")
    if prefix != "kv" or not worker_id or "@" in worker_id or not epoch.isdecimal() or not model_name:
        raise ValueError(f"not a kv@<worker>#<epoch>@<model> topic: {topic!r}")
    return worker_id, int(epoch), model_name


def encode_event_batch(
    ts: float, events: Sequence[KVEvent], *, medium: str | None, encoding: Encoding = "map",
    data_parallel_rank: int | None = None,
) -> bytes:
    """msgpack of ``[ts, [event, ...], data_parallel_rank]``.

    vLLM encodes with ``omit_defaults=True``, which drops only fields that *have* a default;
    BlockStored's first seven fields and BlockRemoved's two have none, so vLLM always sends them,
    None included, and so do we (a msgspec reader of vLLM's structs requires them). The optional
    trailing fields (extra_keys, group_idx, kv_cache_spec_kind, ...) are omitted: Dynamo then
    treats the blocks as main-attention group 0, which is what Tandem's pool holds.
    """
    wire: list[Any] = []
    for event in events:
        if isinstance(event, BlockStored):
            values: tuple[Any, ...] = (event.block_hashes, event.parent_block_hash, event.token_ids,
                                       event.block_size, None, medium, None)  # lora_id, lora_name: no LoRA
        elif isinstance(event, BlockRemoved):
            values = (event.block_hashes, medium)
        elif isinstance(event, AllBlocksCleared):
            values = ()
        else:
            raise TypeError(f"not a KV event: {event!r}")
        tag = type(event).__name__
        wire.append({"type": tag, **dict(zip(_FIELDS[tag], values))} if encoding == "map" else [tag, *values])
    return msgpack.packb([float(ts), wire, data_parallel_rank])


def decode_event_batch(payload: bytes) -> EventBatch:
    """Inverse of :func:`encode_event_batch`; reads map and array events, and vLLM's older 2-element
    batches and shorter array events. Hashes may be u64 or i64 (as Dynamo); unknown map keys are skipped."""
    try:
        raw = msgpack.unpackb(payload)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise KVEventDecodeError(f"payload is not msgpack: {e}") from e
    if not isinstance(raw, list) or len(raw) not in (2, 3) or not isinstance(raw[1], list):
        raise KVEventDecodeError(f"a batch is [ts, [events], dp_rank], got {raw!r:.120}")
    ts, rank = raw[0], raw[2] if len(raw) == 3 else None
    if not (_is_int(ts) or isinstance(ts, float)) or not (rank is None or _is_int(rank)):
        raise KVEventDecodeError(f"need a number ts and an int or None rank, got {ts!r:.40}, {rank!r:.40}")
    return EventBatch(float(ts), tuple(_decode_event(event) for event in raw[1]), rank)


def _decode_event(raw: object) -> KVEvent:
    tag = raw.get("type") if isinstance(raw, dict) else raw[0] if isinstance(raw, list) and raw else None
    if not isinstance(tag, str) or tag not in _FIELDS:
        raise KVEventDecodeError(f"an event is a map or array tagged with a known type, got {raw!r:.80}")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    fields = raw if isinstance(raw, dict) else dict(zip(_FIELDS[tag], raw[1:]))  # type: ignore[index]
    raw_hashes, tokens = fields.get("block_hashes"), fields.get("token_ids") if tag == "BlockStored" else []
    if not isinstance(raw_hashes, list) or not all(map(_is_int, raw_hashes)) or not isinstance(tokens, list):
        raise KVEventDecodeError(f"{tag} needs a list of int block_hashes (and token_ids), got {raw!r:.80}")
    hashes = tuple(BlockHash(h % 2**64) for h in raw_hashes)  # an i64 (Dynamo reads both) to its u64
    if tag == "BlockRemoved":
        return BlockRemoved(hashes)
    parent, size = fields.get("parent_block_hash"), fields.get("block_size")
    if not (parent is None or _is_int(parent)) or not all(_is_int(t) and 0 <= t < 2**32 for t in tokens):
        raise KVEventDecodeError(f"need an int or None parent_block_hash and uint32 token_ids: {raw!r:.80}")
    if not _is_int(size) or size < 1 or len(tokens) != len(hashes) * size:
        raise KVEventDecodeError(f"{len(tokens)} token_ids do not fill {len(hashes)} blocks of {size!r:.20}")
    return BlockStored(hashes, None if parent is None else BlockHash(parent % 2**64), tuple(tokens), size)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # msgpack ints lie in [-2**63, 2**64)
