"""KV hand-off for a tensor-parallel worker: its ranks' kv heads gathered into, or scattered from,
whole wire blocks in rank 0's staging slots (kvtransfer/wire_blocks.py says why through rank 0).

Rank 0 announces each gather or scatter on the control group like a step (GATHER_KV or
SCATTER_KV with the block ids) and every rank then meets in one gather or scatter collective on
the default group (gloo on CPU, NCCL on GPUs). Steps and these commands must reach the followers
in one order, and they come from different threads (the engine thread stages a handle, a
transfer thread scatters a READ), so rank 0 holds the group's lock from the announcement to the
end of the collective, as it does for a step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tandem.kvtransfer.wire_blocks import as_wire_blocks, join_heads, put_blocks, split_heads, take_blocks
from tandem.workers.tensor_parallel_wire import KVCommand, MessageKind

if TYPE_CHECKING:
    from tandem.workers.tensor_parallel import TensorParallelGroup


class TensorParallelBlocks:
    """Rank 0's ShardedBlocks over its own cache shard and the group's followers."""

    def __init__(self, group: TensorParallelGroup, kv_cache: torch.Tensor) -> None:
        self.group = group
        self.kv_cache = kv_cache
        self.wire_bytes_per_block = kv_cache[0].numel() * kv_cache.element_size() * group.size

    def gather(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        ids = tuple(block_ids)
        mine = take_blocks(self.kv_cache, ids)
        shards = [torch.empty_like(mine) for _ in range(self.group.size)]
        with self.group.exclusive:
            self.group.send_kv_command(KVCommand(MessageKind.GATHER_KV, ids))
            self._collective(lambda: dist.gather(mine, shards, dst=0))
        join_heads(shards, self._wire(rows))
        _landed(rows)

    def scatter(self, rows: torch.Tensor, block_ids: Sequence[int]) -> None:
        ids = tuple(block_ids)
        shards = split_heads(self._wire(rows), self.group.size)
        mine = torch.empty_like(shards[0])
        with self.group.exclusive:
            self.group.send_kv_command(KVCommand(MessageKind.SCATTER_KV, ids))
            self._collective(lambda: dist.scatter(mine, shards, src=0))
        put_blocks(self.kv_cache, ids, mine)
        _landed(self.kv_cache)

    def _wire(self, rows: torch.Tensor) -> torch.Tensor:
        return as_wire_blocks(rows, self.kv_cache.shape[1:], self.kv_cache.dtype, self.group.size)

    def _collective(self, run: Callable[[], object]) -> None:
        try:
            run()
        except Exception as e:  # a follower died or hung: the group is done for
            raise self.group.fail(e) from e


def follow_kv_command(command: KVCommand, kv_cache: torch.Tensor) -> None:
    """A follower's side of a GATHER_KV or SCATTER_KV: its heads of the blocks, to or from rank 0."""
    if command.kind == MessageKind.GATHER_KV:
        dist.gather(take_blocks(kv_cache, command.block_ids), None, dst=0)
        return
    mine = torch.empty((len(command.block_ids), *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    dist.scatter(mine, None, src=0)
    put_blocks(kv_cache, command.block_ids, mine)


def _landed(tensor: torch.Tensor) -> None:
    """NIXL reads and writes on its own CUDA streams: the copies must be done before it starts."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
