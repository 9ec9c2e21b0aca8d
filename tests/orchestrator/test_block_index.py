"""Cluster block index: pure event application and prefix walks, then real ZMQ streams.

Follower tests drive a real BlockPool into a real KVEventPublisher on 127.0.0.1 (ephemeral ports,
with replay). PUB/SUB drops what is sent before a subscription lands, so the tests poke with empty
batches while they wait: the first batch the subscriber sees makes it replay what it missed. No
test sleeps for a fixed time.
"""

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tandem.kvtransfer.block_hash import BlockHash, hash_block_tokens, hash_full_blocks
from tandem.kvtransfer.block_pool import BlockPool
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored
from tandem.kvtransfer.kv_event_stream import KVEventPublisher, kv_event_topic
from tandem.orchestrator.block_index import BlockIndex, KVEventFollower, StaleEpochError

BS = 4
LOCAL = "tcp://127.0.0.1:0"
MODEL = "org/model"
PROMPT = list(range(1, 14))  # 3 full blocks of 4 and a partial one
OTHER = list(range(100, 109))  # 2 full blocks, shares nothing with PROMPT


def stored(tokens: Sequence[int], parent: BlockHash | None = None) -> BlockStored:
    """One BlockStored of every full block of ``tokens``, as a worker reports it."""
    n = len(tokens) // BS * BS
    return BlockStored(tuple(hash_full_blocks(tokens, BS, parent)), parent, tuple(tokens[:n]), BS)


# --- BlockIndex, pure -----------------------------------------------------------------------


def test_orchestrator_module_does_not_import_torch() -> None:
    code = "import tandem.orchestrator.block_index, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_stored_removed_cleared() -> None:
    index = BlockIndex(BS)
    index.add_worker("a", 1)
    hashes = hash_full_blocks(PROMPT, BS)
    assert index.apply("a", 1, [stored(PROMPT)])
    assert index.num_blocks("a") == 3 and index.cached_prefix_blocks(PROMPT) == {"a": 3}
    assert index.apply("a", 1, [BlockRemoved((hashes[2],))])
    assert index.cached_prefix_blocks(PROMPT) == {"a": 2}
    assert index.apply("a", 1, [AllBlocksCleared(), stored(PROMPT[:4])])  # in order within a batch
    assert index.cached_prefix_blocks(PROMPT) == {"a": 1}
    assert index.apply("a", 1, [AllBlocksCleared()]) and index.num_blocks("a") == 0


def test_prefix_walk_counts_only_leading_blocks() -> None:
    index = BlockIndex(BS)
    for worker_id in ("a", "b", "c"):
        index.add_worker(worker_id, 7)
    hashes = hash_full_blocks(PROMPT, BS)
    index.apply("a", 7, [stored(PROMPT), BlockRemoved((hashes[1],))])  # holds blocks 0 and 2: a gap
    index.apply("b", 7, [BlockStored((hashes[1], hashes[2]), hashes[0], tuple(PROMPT[4:12]), BS)])  # no block 0
    assert index.cached_prefix_blocks(PROMPT) == {"a": 1, "b": 0, "c": 0}
    assert index.num_blocks("a") == 2 and index.num_blocks("b") == 2


def test_partial_trailing_block_and_short_prompts() -> None:
    index = BlockIndex(BS)
    index.add_worker("a", 0)
    index.apply("a", 0, [stored(PROMPT)])
    assert index.cached_prefix_blocks(PROMPT[:12]) == {"a": 3}
    assert index.cached_prefix_blocks(PROMPT[:11]) == {"a": 2}  # block 3 is partial: not counted
    assert index.cached_prefix_blocks(PROMPT[:3]) == {"a": 0}
    assert index.cached_prefix_blocks(PROMPT[:4] + [999] * 8) == {"a": 1}  # diverges in block 1
    assert index.cached_prefix_blocks([]) == {"a": 0}


def test_block_size_mismatch_is_ignored() -> None:
    index = BlockIndex(BS)
    index.add_worker("a", 0)
    assert index.apply("a", 0, [BlockStored(tuple(hash_full_blocks(PROMPT, 2)), None, tuple(PROMPT[:12]), 2)])
    assert index.num_blocks("a") == 0


def test_unknown_worker_and_stale_epoch_are_ignored() -> None:
    index = BlockIndex(BS)
    assert not index.apply("a", 1, [stored(PROMPT)])
    index.add_worker("a", 2)
    assert not index.apply("a", 1, [stored(PROMPT)])  # an old incarnation's events
    assert not index.apply("a", 3, [stored(PROMPT)])  # an epoch not registered (yet)
    assert index.num_blocks("a") == 0 and index.workers() == [("a", 2)]
    with pytest.raises(StaleEpochError) as info:
        index.add_worker("a", 1)
    assert (info.value.worker_id, info.value.epoch, info.value.current_epoch) == ("a", 1, 2)


def test_new_epoch_drops_old_entries_same_epoch_keeps_them() -> None:
    index = BlockIndex(BS)
    index.add_worker("a", 1)
    index.add_worker("b", 1)
    index.apply("a", 1, [stored(PROMPT)])
    index.apply("b", 1, [stored(PROMPT)])
    index.add_worker("a", 1)
    assert index.num_blocks("a") == 3
    index.add_worker("a", 2)
    assert index.workers() == [("a", 2), ("b", 1)]
    assert index.cached_prefix_blocks(PROMPT) == {"a": 0, "b": 3}
    assert index.apply("a", 2, [stored(OTHER)]) and index.num_blocks("a") == 2


def test_remove_worker() -> None:
    index = BlockIndex(BS)
    index.add_worker("a", 1)
    index.apply("a", 1, [stored(PROMPT)])
    index.remove_worker("a")
    index.remove_worker("never-seen")
    assert index.workers() == [] and index.num_blocks("a") == 0 and index.cached_prefix_blocks(PROMPT) == {}
    assert not index.apply("a", 1, [stored(PROMPT)])


# --- KVEventFollower over real publishers ----------------------------------------------------


class Worker:
    """A publisher fed by a real BlockPool, as a worker of one epoch runs them."""

    def __init__(self, worker_id: str, epoch: int) -> None:
        self.worker_id, self.epoch = worker_id, epoch
        self.topic = kv_event_topic(worker_id, epoch, MODEL)
        self.publisher = KVEventPublisher(LOCAL, replay_endpoint=LOCAL, topic=self.topic)
        self.pool = BlockPool(num_blocks=8, block_size=BS)
        self.pool.subscribe(self.publisher.sink)
        self.publisher.publish([AllBlocksCleared()])  # a fresh epoch's first batch, as worker.py sends

    def follow_args(self) -> tuple[str, int, str, str | None, str]:
        return self.worker_id, self.epoch, self.publisher.endpoint, self.publisher.replay_endpoint, self.topic

    def prefill(self, tokens: Sequence[int]) -> list[int]:
        """Allocate and cache every full block of ``tokens``, hashes chained block by block; one step."""
        blocks = self.pool.allocate(len(tokens) // BS)
        parent: BlockHash | None = None
        for i, block_id in enumerate(blocks):
            chunk = tokens[i * BS : (i + 1) * BS]
            block_hash = hash_block_tokens(parent, chunk)
            self.pool.cache_full_block(block_id, block_hash, parent, chunk)
            parent = block_hash
        self.publisher.flush()
        return blocks


@pytest.fixture
def index() -> BlockIndex:
    return BlockIndex(BS)


@pytest.fixture
def follower(index: BlockIndex) -> Iterator[KVEventFollower]:
    follower = KVEventFollower(index, poll_timeout=0.01)
    yield follower
    follower.close()
    assert not follower._thread.is_alive()


@pytest.fixture
def make_worker() -> Iterator[Callable[[str, int], Worker]]:
    made: list[Worker] = []

    def make(worker_id: str, epoch: int) -> Worker:
        made.append(Worker(worker_id, epoch))
        return made[-1]

    yield make
    for worker in made:
        worker.publisher.close()


def converge(condition: Callable[[], bool], *workers: Worker, timeout: float = 3.0) -> None:
    """Wait until ``condition``, poking each worker with an empty batch: a subscriber that joined
    late sees the poke's seq and replays the batches it missed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the index did not converge in time"
        for worker in workers:
            worker.publisher.publish([])
        time.sleep(0.005)


def test_follower_converges_on_stores_and_evictions(
    index: BlockIndex, follower: KVEventFollower, make_worker: Callable[..., Worker]
) -> None:
    a, b = make_worker("ctx-0", 1), make_worker("gen-0", 1)
    follower.follow(*a.follow_args())
    follower.follow(*b.follow_args())
    assert index.workers() == [("ctx-0", 1), ("gen-0", 1)]  # registered at once
    blocks = a.prefill(PROMPT)
    b.prefill(OTHER)
    converge(lambda: index.cached_prefix_blocks(PROMPT) == {"ctx-0": 3, "gen-0": 0}, a, b)
    converge(lambda: index.num_blocks("gen-0") == 2, b)
    a.pool.free(blocks[::-1])  # tail first: the LRU evicts blocks 2 and 1 first
    a.pool.allocate(7)  # 5 uncached free blocks + 2 evicted: BlockRemoved
    a.publisher.flush()
    converge(lambda: index.cached_prefix_blocks(PROMPT)["ctx-0"] == 1, a)
    assert index.num_blocks("ctx-0") == 1
    assert follower.num_batches_applied >= 4 and follower.num_batches_ignored == 0


def test_a_follower_that_joins_a_quiet_worker_catches_up_without_a_new_event(
    index: BlockIndex, follower: KVEventFollower, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker("ctx-quiet", 1)
    worker.prefill(PROMPT)  # published before anyone follows; then the worker goes quiet
    follower.follow(*worker.follow_args())
    deadline = time.monotonic() + 3.0
    while index.cached_prefix_blocks(PROMPT) != {"ctx-quiet": 3}:  # no poke: catch-up replays it
        assert time.monotonic() < deadline, "the follower did not catch up from the replay socket"
        time.sleep(0.01)


def test_restart_with_new_epoch_replaces_old_entries(
    index: BlockIndex, follower: KVEventFollower, make_worker: Callable[..., Worker]
) -> None:
    old = make_worker("ctx-0", 1)
    follower.follow(*old.follow_args())
    old.prefill(PROMPT)
    converge(lambda: index.num_blocks("ctx-0") == 3, old)
    new = make_worker("ctx-0", 2)  # the restarted worker: new ports, new topic, empty cache
    follower.follow(*new.follow_args())
    assert index.workers() == [("ctx-0", 2)] and index.num_blocks("ctx-0") == 0  # dropped at once
    old.prefill(OTHER)  # the dead incarnation still talking: its subscription is gone
    new.prefill(OTHER[:4])
    converge(lambda: index.num_blocks("ctx-0") == 1, new)
    assert index.cached_prefix_blocks(PROMPT) == {"ctx-0": 0}
    assert index.cached_prefix_blocks(OTHER) == {"ctx-0": 1}
    with pytest.raises(StaleEpochError):
        follower.follow(*old.follow_args())
    assert index.workers() == [("ctx-0", 2)]


def test_in_flight_batches_of_a_superseded_epoch_are_ignored(
    index: BlockIndex, follower: KVEventFollower, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker("ctx-0", 1)
    follower.follow(*worker.follow_args())
    converge(lambda: follower.num_batches_applied > 0, worker)
    index.add_worker("ctx-0", 2)  # a restart learned elsewhere, before the stream is re-followed
    worker.prefill(PROMPT)
    converge(lambda: follower.num_batches_ignored > 0, worker)
    assert index.num_blocks("ctx-0") == 0 and index.workers() == [("ctx-0", 2)]


def test_unfollow_drops_entries_and_follow_again_recovers(
    index: BlockIndex, follower: KVEventFollower, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker("ctx-0", 1)
    follower.follow(*worker.follow_args())
    worker.prefill(PROMPT)
    converge(lambda: index.num_blocks("ctx-0") == 3, worker)
    follower.unfollow("ctx-0")
    assert index.workers() == [] and index.cached_prefix_blocks(PROMPT) == {}
    follower.follow(*worker.follow_args())  # a fresh subscriber replays the stream from seq 0
    converge(lambda: index.num_blocks("ctx-0") == 3, worker)


def test_follow_rejects_a_topic_of_another_worker(follower: KVEventFollower, make_worker: Callable[..., Worker]) -> None:
    worker = make_worker("ctx-0", 1)
    args: list[Any] = list(worker.follow_args())
    args[1] = 2
    with pytest.raises(ValueError, match="is not worker"):
        follower.follow(*args)
    assert follower.index.workers() == []


def test_close_is_bounded_and_final(index: BlockIndex, make_worker: Callable[..., Worker]) -> None:
    follower = KVEventFollower(index)
    follower.follow(*make_worker("ctx-0", 1).follow_args())
    start = time.monotonic()
    follower.close()
    follower.close()
    assert time.monotonic() - start < 1.0 and not follower._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        follower.follow(*make_worker("ctx-1", 1).follow_args())
