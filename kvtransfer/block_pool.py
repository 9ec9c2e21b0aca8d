"""The paged KV block pool of one worker: block ids, reference counts, prefix-cache hashes.

Metadata only, no torch: the KV tensor itself lives in :mod:`tandem.kvtransfer.kv_cache`
and is indexed by the block ids handed out here.

Life cycle of a block::

    free (uncached) --allocate--> in use (ref >= 1) --cache_full_block--> in use, cached
    in use, cached --free to ref 0--> evictable (LRU) --touch--> in use, cached
    evictable --allocate (eviction, BlockRemoved)--> in use (uncached)
    in use, uncached --free to ref 0--> free (uncached)

Every block is in exactly one of: the uncached free heap, the evictable LRU,
or in use; so ``num_free_blocks + num_used_blocks == num_blocks`` always.
Operations that can fail validate first and change nothing on error. KV events go to
subscribed sinks synchronously, after the state change.

Allocation keeps a request's blocks adjacent where it can, because a KV transfer pays per run of
adjacent ids (one NIXL descriptor each; about 6 us on a GPU, as much as moving a megabyte).
Uncached blocks come lowest id first, which keeps the used ids packed; every allocation comes in
ascending id order, so blocks freed together (a finished request's) and taken together again
form the same runs instead of reversed ones; several blocks are taken as runs and one block as
a lone one, so that decode growth does not split what a prompt's reservation would take whole.
An allocation of n blocks costs O(n log N) and looks at no more than 4n + 8 evictable blocks.
"""

import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence

from tandem.kvtransfer.block_hash import BlockHash
from tandem.kvtransfer.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventSink,
)

_SINGLE_BLOCK_SCAN = 8  # how far past the least recently freed block a one-block allocation looks


class NoFreeBlocksError(RuntimeError):
    """allocate() asked for more blocks than are free (nothing was allocated)."""

    def __init__(self, num_requested: int, num_free: int) -> None:
        super().__init__(f"asked for {num_requested} KV blocks but only {num_free} are free")
        self.num_requested = num_requested
        self.num_free = num_free


class BlockPool:
    """Metadata only: block ids, reference counts, hashes. The KV tensor lives elsewhere."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._block_of_hash: dict[BlockHash, int] = {}
        self._free_uncached: list[int] = list(range(num_blocks))  # a min-heap of ids
        self._evictable: OrderedDict[int, None] = OrderedDict()  # head = least recently freed
        self._num_used = 0
        self._sinks: list[KVEventSink] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: uncached free plus evictable cached ones."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_count > 0."""
        return self._num_used

    def subscribe(self, sink: KVEventSink) -> None:
        """Send every future KV event to ``sink`` (called synchronously)."""
        self._sinks.append(sink)

    def find_cached_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the leading run of cached hashes; stops at the first miss. No ref change."""
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one reference on each block; a block at ref 0 leaves the evictable LRU."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0 and block_id not in self._evictable:
                raise RuntimeError(f"touch() on block {block_id}: it is free and not cached")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
                self._num_used += 1
            self._ref_counts[block_id] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh uncached blocks with ref_count 1, in ascending id order; evicts the least recently
        freed cached blocks if needed, that order bent towards runs of adjacent ids."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(num_blocks, self.num_free_blocks)
        if num_blocks == 1:
            block_ids = [heapq.heappop(self._free_uncached)] if self._free_uncached else []
            evicted_ids = [] if block_ids else [self._oldest_alone_evictable()]
        else:
            block_ids = self._uncached_in_runs(num_blocks)
            evicted_ids = self._evictable_runs(num_blocks - len(block_ids))
            while len(block_ids) + len(evicted_ids) < num_blocks and self._free_uncached:
                block_ids.append(heapq.heappop(self._free_uncached))  # lone ones, if runs fell short
            shortfall = num_blocks - len(block_ids) - len(evicted_ids)
            if shortfall:  # cached blocks that are in no run, least recently freed first
                taken = set(evicted_ids)
                evicted_ids += itertools.islice((b for b in self._evictable if b not in taken), shortfall)
        for block_id in evicted_ids:
            del self._evictable[block_id]
        if evicted_ids:
            self._emit(BlockRemoved(tuple(self._drop_hash(block_id) for block_id in evicted_ids)))
        block_ids += evicted_ids
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        self._num_used += num_blocks
        block_ids.sort()
        return block_ids

    def _free_neighbours(self, block_id: int) -> list[int]:
        return [b for b in (block_id - 1, block_id + 1) if 0 <= b < self.num_blocks and self._ref_counts[b] == 0]

    def _is_alone(self, block_id: int) -> bool:
        """No free block beside it: a run can never grow through it."""
        return not self._free_neighbours(block_id)

    def _uncached_in_runs(self, count: int) -> list[int]:
        """Up to count uncached blocks, lowest ids first, beside another uncached free one. Others met
        on the way (mostly finished requests' partial last blocks) stay for single-block growth."""
        in_runs: list[int] = []
        lone: list[int] = []
        while len(in_runs) < count and self._free_uncached and len(lone) < count + _SINGLE_BLOCK_SCAN:
            block_id = heapq.heappop(self._free_uncached)
            beside_uncached = any(self._hashes[b] is None for b in self._free_neighbours(block_id))
            (in_runs if beside_uncached else lone).append(block_id)
        for block_id in lone:
            heapq.heappush(self._free_uncached, block_id)
        return in_runs

    def _oldest_alone_evictable(self) -> int:
        """For one block (a decode's growth): a lone one from among the least recently freed few,
        so that it does not split a run a prompt's reservation would take whole."""
        oldest = list(itertools.islice(self._evictable, _SINGLE_BLOCK_SCAN))
        return next((b for b in oldest if self._is_alone(b)), oldest[0])

    def _evictable_runs(self, count: int) -> list[int]:
        """Up to count evictable blocks in runs of adjacent ids, least recently freed first: each old
        block beside another evictable one takes the evictable blocks just below it. A request's
        blocks are ascending and freed tail first, so those are its earlier blocks, next in LRU
        order anyway, and a prefix still outlives its suffix. Looks at a bounded stretch of the LRU."""
        chosen: dict[int, None] = {}
        for seed in itertools.islice(self._evictable, 4 * count + _SINGLE_BLOCK_SCAN):
            if len(chosen) == count:
                break
            if seed in chosen or all(self._hashes[b] is None for b in self._free_neighbours(seed)):
                continue
            chosen[seed] = None
            below = seed - 1  # downwards only: the blocks above are younger, or another request's head
            while len(chosen) < count and below in self._evictable and below not in chosen:
                chosen[below] = None
                below -= 1
        return list(chosen)

    def cache_full_block(
        self,
        block_id: int,
        block_hash: BlockHash,
        parent_hash: BlockHash | None,
        token_ids: Sequence[int],
    ) -> None:
        """Register an in-use block that now holds a full block of computed KV; emits BlockStored.

        No-op if the block already has this hash, if another block already holds
        this hash (this one stays uncached), or if prefix caching is disabled.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise RuntimeError(f"cache_full_block() on block {block_id}, which is not in use")
        if len(token_ids) != self.block_size:
            raise ValueError(f"a full block has {self.block_size} tokens, got {len(token_ids)}")
        if not self.enable_prefix_caching:
            return
        current = self._hashes[block_id]
        if current == block_hash:
            return
        if current is not None:
            raise RuntimeError(f"block {block_id} already cached with hash {current}, not {block_hash}")
        if block_hash in self._block_of_hash:
            return
        self._hashes[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id
        self._emit(BlockStored((block_hash,), parent_hash, tuple(token_ids), self.block_size))

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference each; at ref 0 a cached block joins the LRU tail, in the order given.

        Pass a sequence's blocks in reverse so that its tail is evicted first.
        """
        for block_id, count in Counter(block_ids).items():
            self._check_id(block_id)
            if self._ref_counts[block_id] < count:
                raise RuntimeError(
                    f"free() of block {block_id} {count} time(s) with ref_count {self._ref_counts[block_id]}"
                )
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            self._num_used -= 1
            if self._hashes[block_id] is None:
                heapq.heappush(self._free_uncached, block_id)
            else:
                self._evictable[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False, nothing changed) while any block is in use."""
        if self._num_used > 0:
            return False
        for block_id in self._evictable:
            self._hashes[block_id] = None
            self._free_uncached.append(block_id)
        heapq.heapify(self._free_uncached)
        self._evictable.clear()
        self._block_of_hash.clear()
        self._emit(AllBlocksCleared())
        return True

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The hash a block is cached under, or None."""
        self._check_id(block_id)
        return self._hashes[block_id]

    def ref_count(self, block_id: int) -> int:
        """Number of references held on a block."""
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} outside [0, {self.num_blocks})")

    def _drop_hash(self, block_id: int) -> BlockHash:
        block_hash = self._hashes[block_id]
        assert block_hash is not None and self._block_of_hash[block_hash] == block_id
        del self._block_of_hash[block_hash]
        self._hashes[block_id] = None
        return block_hash

    def _emit(self, event: KVEvent) -> None:
        for sink in self._sinks:
            sink(event)
