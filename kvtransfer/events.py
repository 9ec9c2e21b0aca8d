"""Typed KV-cache events a worker's block pool emits as its prefix cache changes.

The block pool produces these values; a publisher (elsewhere) serializes them
to the vLLM KV-events wire format (msgpack over ZMQ, read by the cluster block
index, Dynamo and llm-d). Field names mirror that format's ``BlockStored``,
``BlockRemoved`` and ``AllBlocksCleared``; wire-only fields (``medium``,
``lora_name``, ...) are filled in by the serializer. Hashes are unsigned 64-bit
ints from :mod:`tandem.kvtransfer.block_hash`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from tandem.kvtransfer.block_hash import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks that now hold computed KV and can serve prefix hits."""

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None  # hash of the block before the first one; None at the start
    token_ids: tuple[int, ...]  # all tokens of the stored blocks, concatenated
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks that were evicted: their hashes no longer hit."""

    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache of this worker was dropped."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared
KVEventSink: TypeAlias = Callable[[KVEvent], None]
