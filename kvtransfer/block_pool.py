"""The paged KV block pool of one worker: block ids, reference counts, prefix-cache hashes.

Metadata only, no torch: the KV tensor itself lives in :mod:`tandem.kvtransfer.kv_cache`
and is indexed by the block ids handed out here.

Life cycle of a block::

    free (uncached) --allocate--> in use (ref >= 1) --cache_full_block--> in use, cached
    in use, cached --free to ref 0--> evictable (LRU) --touch--> in use, cached
    evictable --allocate (eviction, BlockRemoved)--> in use (uncached)
    in use, uncached --free to ref 0--> free (uncached)

Every block is in exactly one of: the uncached free list, the evictable LRU,
or in use; so ``num_free_blocks + num_used_blocks == num_blocks`` always.
Each operation costs O(1) per block it touches. Operations that can fail
validate first and change nothing on error. KV events go to subscribed sinks
synchronously, after the state change.
"""

from collections import Counter, OrderedDict, deque
from collections.abc import Sequence

from tandem.kvtransfer.block_hash import BlockHash
from tandem.kvtransfer.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventSink,
)


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
        self._free_uncached: deque[int] = deque(range(num_blocks))
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
        """Fresh uncached blocks with ref_count 1; evicts least recently freed cached blocks if needed."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(num_blocks, self.num_free_blocks)
        block_ids: list[int] = []
        evicted: list[BlockHash] = []
        for _ in range(num_blocks):
            if self._free_uncached:
                block_id = self._free_uncached.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                evicted.append(self._drop_hash(block_id))
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        self._num_used += num_blocks
        if evicted:
            self._emit(BlockRemoved(tuple(evicted)))
        return block_ids

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
                self._free_uncached.append(block_id)
            else:
                self._evictable[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False, nothing changed) while any block is in use."""
        if self._num_used > 0:
            return False
        for block_id in self._evictable:
            self._hashes[block_id] = None
            self._free_uncached.append(block_id)
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
