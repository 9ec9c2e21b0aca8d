"""Which KV blocks each sequence holds: admission with prefix-cache hits, growth, release.

The block pool (tandem.kvtransfer.block_pool) knows blocks; this module knows sequences. A
sequence's block table covers its computed tokens plus the tokens scheduled this step. Once a
block is full and computed, its chained hash is registered so later prompts can reuse it.
"""
from __future__ import annotations

from tandem.kvtransfer.block_hash import hash_block_tokens
from tandem.kvtransfer.block_pool import BlockPool
from tandem.workers.sequence import Sequence


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class SequenceBlocks:
    """Allocation of the pool's blocks to sequences. Never leaks: every path ends in free()."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Leading blocks of seq already in the cache. At least one token is always left to
        compute, since the step that computes it also yields the logits for the next token."""
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = []
        parent = None
        for index in range(max_blocks):
            start = index * self.block_size
            parent = hash_block_tokens(parent, seq.token_ids[start : start + self.block_size])
            hashes.append(parent)
        return self.pool.find_cached_prefix(hashes)

    def admit(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> bool:
        """Give a waiting seq its cached prefix plus room for num_new_tokens; False if it can't fit."""
        assert not seq.block_ids, f"{seq.request_id} already holds blocks"
        num_cached_tokens = len(cached_block_ids) * self.block_size
        total = blocks_for_tokens(num_cached_tokens + num_new_tokens, self.block_size)
        num_fresh = total - len(cached_block_ids)
        # Cached blocks that nobody references sit in the evictable set: touching them removes
        # them from what allocate() may hand out, so count them against the free budget too.
        num_idle_cached = sum(1 for b in cached_block_ids if self.pool.ref_count(b) == 0)
        if num_fresh + num_idle_cached > self.pool.num_free_blocks:
            return False
        self.pool.touch(cached_block_ids)
        seq.block_ids = list(cached_block_ids) + self.pool.allocate(num_fresh)
        seq.block_hashes = [self.pool.block_hash(b) for b in cached_block_ids]  # type: ignore[misc]
        seq.num_computed_tokens = num_cached_tokens
        return True

    def num_blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        total = blocks_for_tokens(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_ids))

    def grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for num_new_tokens more tokens of a running seq; False if the pool is short."""
        need = self.num_blocks_to_grow(seq, num_new_tokens)
        if need > self.pool.num_free_blocks:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full and computed in the last step."""
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(len(seq.block_hashes), num_full):
            start = index * self.block_size
            tokens = seq.token_ids[start : start + self.block_size]
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block_tokens(parent, tokens)
            self.pool.cache_full_block(seq.block_ids[index], block_hash, parent, tokens)
            seq.block_hashes.append(block_hash)

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks, tail first, so its prefix outlives its tail in the prefix cache."""
        self.pool.free(list(reversed(seq.block_ids)))
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
