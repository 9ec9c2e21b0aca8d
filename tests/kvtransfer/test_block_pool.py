"""BlockPool: allocation, prefix hits, LRU eviction, KV events, no leaks."""

import random
from collections import Counter

import pytest

from tandem.kvtransfer.block_hash import BlockHash, hash_full_blocks
from tandem.kvtransfer.block_pool import BlockPool, NoFreeBlocksError
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

BLOCK = 4


def make_pool(num_blocks: int, enable_prefix_caching: bool = True) -> tuple[BlockPool, list[KVEvent]]:
    pool = BlockPool(num_blocks, block_size=BLOCK, enable_prefix_caching=enable_prefix_caching)
    events: list[KVEvent] = []
    pool.subscribe(events.append)
    return pool, events


def assert_no_leak(pool: BlockPool) -> None:
    assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
    assert pool.num_used_blocks == sum(pool.ref_count(b) > 0 for b in range(pool.num_blocks))


def run_sequence(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate blocks for ``tokens``, cache the full ones, return the block ids (ref 1 each)."""
    num_blocks = -(-len(tokens) // BLOCK)
    block_ids = pool.allocate(num_blocks)
    parent: BlockHash | None = None
    for i, block_hash in enumerate(hash_full_blocks(tokens, BLOCK)):
        pool.cache_full_block(block_ids[i], block_hash, parent, tokens[i * BLOCK : (i + 1) * BLOCK])
        parent = block_hash
    return block_ids


def test_fresh_pool_is_all_free() -> None:
    pool, events = make_pool(8)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (8, 0)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3 and all(pool.ref_count(b) == 1 for b in ids)
    assert all(pool.block_hash(b) is None for b in ids)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (5, 3)
    assert pool.allocate(0) == []
    assert events == []
    assert_no_leak(pool)


def test_block_stored_event_content() -> None:
    pool, events = make_pool(8)
    tokens = list(range(100, 110))  # 2 full blocks + 2 tokens
    ids = run_sequence(pool, tokens)
    h = hash_full_blocks(tokens, BLOCK)
    assert events == [
        BlockStored((h[0],), None, (100, 101, 102, 103), BLOCK),
        BlockStored((h[1],), h[0], (104, 105, 106, 107), BLOCK),
    ]
    assert [pool.block_hash(b) for b in ids] == [h[0], h[1], None]
    pool.cache_full_block(ids[0], h[0], None, tokens[:BLOCK])  # same hash again: no-op
    assert len(events) == 2


def test_prefix_hit_after_free() -> None:
    pool, _ = make_pool(8)
    tokens = list(range(12))
    ids = run_sequence(pool, tokens)
    pool.free(list(reversed(ids)))
    assert pool.num_used_blocks == 0 and pool.num_free_blocks == 8
    hashes = hash_full_blocks(tokens + [99], BLOCK)
    assert pool.find_cached_prefix(hashes) == ids
    assert pool.ref_count(ids[0]) == 0  # lookup takes no reference
    other = hash_full_blocks([0, 1, 2, 3, 7, 7, 7, 7, 8, 9, 10, 11], BLOCK)
    assert pool.find_cached_prefix(other) == ids[:1]  # stops at the first miss
    assert pool.find_cached_prefix([BlockHash(12345)] + hashes) == []  # a leading miss hits nothing
    pool.touch(ids)
    assert [pool.ref_count(b) for b in ids] == [1, 1, 1]
    assert pool.num_used_blocks == 3
    assert_no_leak(pool)


def test_uncached_free_blocks_are_used_before_eviction() -> None:
    pool, events = make_pool(4)
    cached = run_sequence(pool, list(range(8)))  # 2 cached blocks
    pool.free(list(reversed(cached)))
    events.clear()
    fresh = pool.allocate(2)
    assert not set(fresh) & set(cached)
    assert events == []
    assert pool.find_cached_prefix(hash_full_blocks(list(range(8)), BLOCK)) == cached


def test_lru_evicts_least_recently_freed_and_tail_first() -> None:
    pool, events = make_pool(6)
    a_tokens, b_tokens = list(range(12)), list(range(50, 62))
    a = run_sequence(pool, a_tokens)
    b = run_sequence(pool, b_tokens)
    pool.free(list(reversed(a)))  # a's blocks freed first, its tail first
    pool.free(list(reversed(b)))
    events.clear()
    first = pool.allocate(2)
    assert first == sorted([a[2], a[1]])  # the two least recently freed, handed out in id order
    a_hashes = hash_full_blocks(a_tokens, BLOCK)
    assert events == [BlockRemoved((a_hashes[2], a_hashes[1]))]
    assert pool.find_cached_prefix(a_hashes) == a[:1]  # hashes dropped, head still hits
    assert pool.block_hash(a[2]) is None
    assert pool.allocate(1) == [a[0]]
    assert pool.allocate(1) == [b[2]]
    assert pool.find_cached_prefix(a_hashes) == []
    assert_no_leak(pool)


def test_blocks_freed_together_come_back_as_one_run_of_adjacent_ids() -> None:
    pool, events = make_pool(12)
    a = run_sequence(pool, list(range(32)))  # blocks 0..7, all cached
    b = run_sequence(pool, list(range(100, 116)))  # blocks 8..11
    pool.free(a[::-1])  # tail first: the LRU holds 7, 6, ..., 0
    pool.free(b[::-1])
    events.clear()
    assert pool.allocate(8) == a  # one run, ascending (a transfer moves it with one descriptor)
    (removed,) = events
    assert set(removed.block_hashes) == set(hash_full_blocks(list(range(32)), BLOCK))
    assert_no_leak(pool)


def test_a_run_never_takes_the_next_requests_head_before_its_tail() -> None:
    pool, events = make_pool(8)
    a_tokens, b_tokens = list(range(16)), list(range(100, 116))
    a, b = run_sequence(pool, a_tokens), run_sequence(pool, b_tokens)  # blocks 0..3 and 4..7
    pool.free(a[::-1])
    pool.free(b[::-1])
    events.clear()
    assert pool.allocate(5) == a + b[3:]  # all of a, then b's tail; block 4 (b's head) stays
    assert pool.find_cached_prefix(hash_full_blocks(b_tokens, BLOCK)) == b[:3]
    assert events == [BlockRemoved((*hash_full_blocks(a_tokens, BLOCK)[::-1], hash_full_blocks(b_tokens, BLOCK)[3]))]


def test_one_block_growth_takes_a_lone_block_before_splitting_a_run() -> None:
    pool, _ = make_pool(6)
    run, x, lone, y = (run_sequence(pool, list(range(s, s + n * BLOCK))) for s, n in ((0, 3), (100, 1), (200, 1), (300, 1)))
    assert (run, lone) == ([0, 1, 2], [4])
    pool.free(run[::-1])  # least recently freed: 2, 1, 0
    pool.free(lone)  # 4: blocks 3 and 5 are in use
    assert pool.allocate(1) == lone  # not the older 2, which would split the run
    assert pool.allocate(3) == run
    pool.free(x + y + run + lone)
    assert_no_leak(pool)


def test_a_multi_block_allocation_leaves_a_lone_uncached_block_to_growth() -> None:
    pool, _ = make_pool(6)
    kept = run_sequence(pool, list(range(6)))  # blocks 0 (full, cached) and 1 (partial, uncached)
    gap = run_sequence(pool, list(range(50, 54)))  # 2
    run = run_sequence(pool, list(range(100, 108)))  # 3, 4
    pool.allocate(1)  # 5
    pool.free([kept[1]])  # 1: uncached, alone (0 and 2 in use)
    pool.free(run[::-1])
    assert pool.allocate(2) == run  # the cached run, not the lone uncached block and half a run
    assert pool.allocate(1) == [kept[1]]  # growth takes the lone uncached block
    assert gap == [2] and pool.num_free_blocks == 0
    assert_no_leak(pool)


def test_touched_block_is_not_evicted() -> None:
    pool, events = make_pool(3)
    ids = run_sequence(pool, list(range(12)))
    pool.free(list(reversed(ids)))  # LRU: ids[2], ids[1], ids[0]
    pool.touch([ids[2]])
    assert pool.num_free_blocks == 2
    assert sorted(pool.allocate(2)) == sorted(ids[:2])
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    assert pool.block_hash(ids[2]) is not None
    pool.free([ids[2]])  # back to the LRU: evictable again
    events.clear()
    assert pool.allocate(1) == [ids[2]]
    assert len(events) == 1 and isinstance(events[0], BlockRemoved)
    assert_no_leak(pool)


def test_refreed_block_moves_to_lru_tail() -> None:
    pool, _ = make_pool(2)
    x, y = run_sequence(pool, list(range(8)))
    pool.free([x, y])  # LRU: x, y
    pool.touch([x])
    pool.free([x])  # LRU: y, x
    assert pool.allocate(1) == [y]


def test_shared_block_stays_in_use_until_last_reference() -> None:
    pool, _ = make_pool(4)
    ids = run_sequence(pool, list(range(8)))
    pool.touch(ids)  # a second sequence shares the prefix
    pool.free(ids)
    assert [pool.ref_count(b) for b in ids] == [1, 1]
    assert pool.num_free_blocks == 2
    pool.free(ids)
    assert pool.num_free_blocks == 4
    assert_no_leak(pool)


def test_duplicate_hash_on_second_block_stays_uncached() -> None:
    pool, events = make_pool(2)
    tokens = list(range(4))
    first = run_sequence(pool, tokens)
    second = run_sequence(pool, tokens)  # computed twice, e.g. two concurrent prompts
    assert len(events) == 1
    assert pool.block_hash(second[0]) is None
    assert pool.find_cached_prefix(hash_full_blocks(tokens, BLOCK)) == first
    pool.free(second)  # uncached: straight back to the free list
    pool.free(first)
    assert pool.allocate(1) == second  # uncached block preferred over the cached one
    assert pool.find_cached_prefix(hash_full_blocks(tokens, BLOCK)) == first


def test_prefix_caching_disabled_caches_nothing() -> None:
    pool, events = make_pool(4, enable_prefix_caching=False)
    tokens = list(range(8))
    ids = run_sequence(pool, tokens)
    assert events == [] and all(pool.block_hash(b) is None for b in ids)
    pool.free(ids)
    assert pool.find_cached_prefix(hash_full_blocks(tokens, BLOCK)) == []
    assert_no_leak(pool)


def test_reset_prefix_cache_refused_while_in_use() -> None:
    pool, events = make_pool(4)
    tokens = list(range(8))
    ids = run_sequence(pool, tokens)
    pool.free(ids[1:])
    events.clear()
    assert pool.reset_prefix_cache() is False
    assert events == []
    assert pool.find_cached_prefix(hash_full_blocks(tokens, BLOCK)) == ids
    pool.free(ids[:1])
    assert pool.reset_prefix_cache() is True
    assert events == [AllBlocksCleared()]
    assert pool.find_cached_prefix(hash_full_blocks(tokens, BLOCK)) == []
    assert all(pool.block_hash(b) is None for b in range(4))
    pool.allocate(4)  # all free and uncached: no eviction events
    assert events == [AllBlocksCleared()]
    assert_no_leak(pool)


def pool_state(pool: BlockPool, hashes: list[BlockHash]) -> tuple[object, ...]:
    per_block = [(pool.ref_count(b), pool.block_hash(b)) for b in range(pool.num_blocks)]
    return (pool.num_free_blocks, pool.num_used_blocks, per_block, pool.find_cached_prefix(hashes))


def test_no_free_blocks_error_changes_nothing() -> None:
    pool, events = make_pool(4)
    tokens = list(range(12))
    hashes = hash_full_blocks(tokens, BLOCK)
    ids = run_sequence(pool, tokens)
    pool.free(list(reversed(ids[1:])))  # 1 uncached free block, 2 evictable, 1 in use
    before = pool_state(pool, hashes)
    events.clear()
    with pytest.raises(NoFreeBlocksError, match="asked for 4 KV blocks but only 3 are free"):
        pool.allocate(4)
    assert pool_state(pool, hashes) == before
    assert events == []
    assert pool.allocate(3) == sorted([3, ids[1], ids[2]])  # the uncached block 3 and both evictable ones
    assert events == [BlockRemoved(tuple(hashes[2:0:-1]))]  # evicted in LRU order, untouched


def test_misuse_raises_and_changes_nothing() -> None:
    pool, _ = make_pool(4)
    tokens = list(range(4))
    hashes = hash_full_blocks(tokens, BLOCK)
    ids = run_sequence(pool, tokens)
    before = pool_state(pool, hashes)
    with pytest.raises(RuntimeError):
        pool.free([ids[0], ids[0]])  # ref 1, freed twice
    with pytest.raises(RuntimeError):
        pool.free([3])  # never allocated
    with pytest.raises(RuntimeError):
        pool.touch([ids[0], 3])  # 3 is free and uncached
    with pytest.raises(RuntimeError):
        pool.cache_full_block(3, BlockHash(1), None, [0] * BLOCK)  # not in use
    with pytest.raises(RuntimeError):
        pool.cache_full_block(ids[0], BlockHash(1), None, tokens)  # already cached under another hash
    with pytest.raises(ValueError):
        pool.cache_full_block(ids[0], hashes[0], None, tokens[:2])  # not a full block
    with pytest.raises(IndexError):
        pool.ref_count(4)
    assert pool_state(pool, hashes) == before


def test_random_operations_never_leak_and_events_track_cache() -> None:
    rng = random.Random(1234)
    pool, events = make_pool(16)
    held: list[int] = []  # one entry per reference we hold
    hash_space = [BlockHash(h) for h in range(40)]
    for _ in range(800):
        op = rng.choices(["allocate", "cache", "free", "touch", "reset"], weights=[6, 8, 5, 4, 1])[0]
        if op == "allocate":
            n = rng.randint(0, 6)
            try:
                held += pool.allocate(n)
            except NoFreeBlocksError:
                assert n > pool.num_free_blocks
        elif op == "cache" and held:
            block_id = rng.choice(held)
            block_hash = pool.block_hash(block_id)
            if block_hash is None:
                block_hash = rng.choice(hash_space)
            pool.cache_full_block(block_id, block_hash, None, [block_hash] * BLOCK)
        elif op == "free" and held:
            rng.shuffle(held)
            k = rng.randint(1, len(held))
            pool.free(held[:k])
            held = held[k:]
        elif op == "touch":
            hits = pool.find_cached_prefix([rng.choice(hash_space)])
            pool.touch(hits)
            held += hits
        elif op == "reset":
            assert pool.reset_prefix_cache() is (not held)
        check_against_model(pool, held, events)


def check_against_model(pool: BlockPool, held: list[int], events: list[KVEvent]) -> None:
    assert_no_leak(pool)
    refs = Counter(held)
    assert [pool.ref_count(b) for b in range(pool.num_blocks)] == [refs[b] for b in range(pool.num_blocks)]
    cached = {pool.block_hash(b): b for b in range(pool.num_blocks) if pool.block_hash(b) is not None}
    assert len(cached) == sum(pool.block_hash(b) is not None for b in range(pool.num_blocks))
    for block_hash, block_id in cached.items():
        assert pool.find_cached_prefix([block_hash]) == [block_id]
    assert replay(events) == set(cached)


def replay(events: list[KVEvent]) -> set[BlockHash]:
    """The set of cached hashes a consumer of the event stream would hold."""
    hashes: set[BlockHash] = set()
    for event in events:
        if isinstance(event, BlockStored):
            assert not hashes & set(event.block_hashes)
            hashes.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            assert set(event.block_hashes) <= hashes
            hashes.difference_update(event.block_hashes)
        else:
            hashes.clear()
    return hashes
