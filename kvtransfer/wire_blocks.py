"""Wire blocks: a KV block crosses between workers whole, with every kv head of the model.

A worker of tensor-parallel size P keeps kv heads ``[r*h, (r+1)*h)`` (h = H / P) on rank r, each
rank in its own block-major cache ``[blocks, layers, 2, block_size, h, head_dim]``
(kvtransfer/kv_cache.py). What a READ moves is one format for every P, the cache of a P=1
worker: ``[layers, 2, block_size, H, head_dim]`` per block. So any context TP size pairs with any
generation TP size, and each side re-splits on its own: the owner gathers its ranks' heads into
whole blocks in its staging slots when it makes the handle, the reader READs those into its own
staging slots and scatters each rank its heads. A P=1 worker's cache already is the wire format
and skips both.

Why through rank 0 and not a READ per rank of the heads it needs: in this layout the heads of one
rank are ``layers * 2 * block_size`` strided pieces of a block, a NIXL descriptor each (about
6 us apiece on GPUs), while a gather or scatter over the tensor-parallel group is one collective
at NVLink speed. The price is one more copy through rank 0's memory, and staging slots there.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tandem.kvtransfer.staging import gather_into_slots, scatter_from_slots


class ShardedBlocks(Protocol):
    """A worker whose KV cache holds a share of the kv heads, seen as whole wire blocks.

    ``rows`` are staging slots: uint8 ``[n, wire_bytes_per_block]``, one wire block each."""

    wire_bytes_per_block: int

    def gather(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """rows[i] = block block_ids[i] with every rank's heads, landed when it returns."""

    def scatter(self, rows: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Each rank's heads of rows[i] into its block block_ids[i], landed when it returns."""


def as_wire_blocks(rows: torch.Tensor, shard_block: torch.Size, dtype: torch.dtype, size: int) -> torch.Tensor:
    """Staging rows as wire blocks ``[n, layers, 2, block_size, heads * size, head_dim]``, given one
    rank's block shape ``shard_block`` = ``(layers, 2, block_size, heads, head_dim)``."""
    *outer, heads, head_dim = shard_block
    return rows.view(dtype).view(rows.shape[0], *outer, heads * size, head_dim)


def join_heads(shards: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """out = the ranks' blocks side by side along the kv-head dimension, rank 0's heads first."""
    torch.cat(list(shards), dim=-2, out=out)


def split_heads(blocks: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Wire blocks cut into each rank's heads, contiguous, as a collective sends them."""
    return [shard.contiguous() for shard in blocks.chunk(size, dim=-2)]


def as_rows(blocks: torch.Tensor) -> torch.Tensor:
    """A contiguous [blocks, ...] tensor as one row of bytes per block, what staging copies move."""
    return blocks.view(torch.uint8).view(blocks.shape[0], -1)


def take_blocks(kv_cache: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
    """kv_cache[block_ids] as a new contiguous tensor."""
    blocks = kv_cache.new_empty((len(block_ids), *kv_cache.shape[1:]))
    gather_into_slots(as_rows(blocks), as_rows(kv_cache), block_ids)
    return blocks


def put_blocks(kv_cache: torch.Tensor, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
    """kv_cache[block_ids[i]] = blocks[i]."""
    scatter_from_slots(as_rows(kv_cache), block_ids, as_rows(blocks))


class WireRows:
    """How one worker's blocks become wire rows (staging slots) and back: a copy of whole rows
    when its cache is the wire format, a gather or scatter over its ranks when it is ``sharded``."""

    def __init__(self, kv_cache: torch.Tensor, sharded: ShardedBlocks | None = None) -> None:
        self.sharded = sharded
        self.in_place = sharded is None  # peers may READ the cache's own blocks
        self.bytes_per_block = sharded.wire_bytes_per_block if sharded else kv_cache[0].numel() * kv_cache.element_size()
        self._rows = as_rows(kv_cache) if sharded is None else None

    def pack(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """rows[i] = wire block of block_ids[i]."""
        if self.sharded is not None:
            self.sharded.gather(block_ids, rows)
        else:
            gather_into_slots(rows, self._rows, block_ids)

    def unpack(self, rows: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Block block_ids[i] = wire block rows[i]."""
        if self.sharded is not None:
            self.sharded.scatter(rows, block_ids)
        else:
            scatter_from_slots(self._rows, block_ids, rows)
