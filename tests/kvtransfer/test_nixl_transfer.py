"""TransferEngine over real NIXL (UCX, DRAM): the block owner lives in another process."""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import NamedTuple

import pytest
import torch

from tandem.kvtransfer.block_runs import coalesce_runs
from tandem.kvtransfer.kv_cache import KVCacheSpec, allocate_kv_cache
from tandem.kvtransfer.nixl_transfer import (
    PeerMetadata,
    StalePeerError,
    TransferEngine,
    TransferError,
    TransferTimeout,
)

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
NUM_BLOCKS = 32
CPU = torch.device("cpu")


def owner_cache(seed: int) -> torch.Tensor:
    """Every element distinct, so every block is: block b holds seed*1e6 + b*elems + 0..elems-1."""
    kv_cache = allocate_kv_cache(SPEC, NUM_BLOCKS, CPU)
    kv_cache.view(-1).copy_(torch.arange(kv_cache.numel(), dtype=torch.float32) + seed * 1e6)
    return kv_cache


def serve_owner(name: str, worker_id: str, epoch: int, seed: int, out: mp.Queue, stop: mp.Event) -> None:
    """Child process: hold a cache, publish its metadata, forward notifications until told to stop."""
    engine = TransferEngine(name, owner_cache(seed), worker_id=worker_id, epoch=epoch)
    out.put(engine.metadata())
    while not stop.is_set():
        for notif in engine.poll_notifications():
            out.put(notif)
        time.sleep(0.002)
    engine.close()


class Owner:
    def __init__(self, name: str, worker_id: str, epoch: int = 1, seed: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self.out, self.stop = ctx.Queue(), ctx.Event()
        self.process = ctx.Process(target=serve_owner, args=(name, worker_id, epoch, seed, self.out, self.stop), daemon=True)
        self.process.start()
        self.cache = owner_cache(seed)
        self._meta: PeerMetadata | None = None

    def metadata(self) -> PeerMetadata:
        if self._meta is None:
            self._meta = self.out.get(timeout=60)
        return self._meta

    def next_notification(self, timeout: float = 5.0) -> tuple[str, bytes]:
        return self.out.get(timeout=timeout)

    def shutdown(self) -> None:
        self.stop.set()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@pytest.fixture(scope="module")
def owners(request: pytest.FixtureRequest) -> dict[str, Owner]:
    """Both owner processes, started together so their start-up (imports) overlaps."""
    owners = {"owner": Owner("owner-agent", "owner"), "doomed": Owner("doomed-agent", "doomed", seed=9)}
    for owner in owners.values():
        request.addfinalizer(owner.shutdown)
    return owners


@pytest.fixture(scope="module")
def owner(owners: dict[str, Owner]) -> Owner:
    owners["owner"].metadata()
    return owners["owner"]


class Reader(NamedTuple):
    engine: TransferEngine
    cache: torch.Tensor  # filled with -1 before the test


_reader_names = itertools.count()


@pytest.fixture
def reader(request: pytest.FixtureRequest, owner: Owner) -> Reader:
    kv_cache = allocate_kv_cache(SPEC, NUM_BLOCKS, CPU).fill_(-1.0)
    engine = TransferEngine(f"reader-{next(_reader_names)}", kv_cache, worker_id="reader", epoch=1)
    request.addfinalizer(engine.close)
    engine.add_peer(owner.metadata())
    return Reader(engine, kv_cache)


def in_seconds(seconds: float) -> float:
    return time.monotonic() + seconds


# coalesce_runs: pure


def test_coalesce_runs_merges_when_both_sides_step_by_one() -> None:
    assert coalesce_runs([], []) == []
    assert coalesce_runs([3, 4, 5], [10, 11, 12]) == [(3, 10, 3)]
    assert coalesce_runs([3, 4, 5, 9], [10, 11, 12, 0]) == [(3, 10, 3), (9, 0, 1)]
    assert coalesce_runs([3, 4, 5], [10, 12, 13]) == [(3, 10, 1), (4, 12, 2)]  # local breaks the run
    assert coalesce_runs([3, 5, 6], [10, 11, 12]) == [(3, 10, 1), (5, 11, 2)]  # remote breaks the run
    assert coalesce_runs([0, 1, 2], [2, 1, 0]) == [(0, 2, 1), (1, 1, 1), (2, 0, 1)]


def test_coalesce_runs_sorts_pairs_by_remote_id() -> None:
    assert coalesce_runs([5, 4, 7, 6], [1, 0, 3, 2]) == [(4, 0, 4)]
    assert coalesce_runs([9, 1, 2], [5, 7, 8]) == [(1, 7, 2), (9, 5, 1)]


def test_coalesce_runs_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 remote ids but 1 local"):
        coalesce_runs([1, 2], [1])


# TransferEngine against an owner in another process


def test_read_blocks_copies_exact_bytes_and_notifies_owner(owner: Owner, reader: Reader) -> None:
    remote, local = [3, 4, 5, 9, 20], [10, 11, 12, 0, 31]
    stats = reader.engine.read_blocks("owner", 1, remote, local, deadline=in_seconds(5), notification=b"req-1")
    kv_cache = reader.cache
    assert torch.equal(kv_cache[local], owner.cache[remote])
    untouched = sorted(set(range(NUM_BLOCKS)) - set(local))
    assert bool((kv_cache[untouched] == -1.0).all())
    assert stats.num_blocks == 5 and stats.num_descriptors == 3
    assert stats.num_bytes == 5 * SPEC.bytes_per_block and stats.seconds > 0
    assert owner.next_notification() == (reader.engine.metadata().agent_name, b"req-1")


def test_coalescing_reduces_descriptors(owner: Owner, reader: Reader) -> None:
    kv_cache = reader.cache
    contiguous = reader.engine.read_blocks("owner", 1, range(8, 24), range(0, 16), deadline=in_seconds(5))
    assert contiguous.num_descriptors == 1 and torch.equal(kv_cache[0:16], owner.cache[8:24])
    reversed_ = reader.engine.read_blocks("owner", 1, range(8, 24), range(31, 15, -1), deadline=in_seconds(5))
    assert reversed_.num_descriptors == 16 and torch.equal(kv_cache[16:32], owner.cache[8:24].flip(0))


def test_concurrent_reads_from_threads(owner: Owner, reader: Reader) -> None:
    kv_cache = reader.cache
    failures: list[BaseException] = []

    def read(t: int) -> None:
        try:
            for i in range(10):
                remote = [(t * 7 + i * 3 + k * 5) % NUM_BLOCKS for k in range(8)]
                local = list(range(t * 8, t * 8 + 8))
                reader.engine.read_blocks("owner", 1, remote, local, deadline=in_seconds(10))
                assert torch.equal(kv_cache[local], owner.cache[remote])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=read, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    notifications = [reader.engine.poll_notifications() for _ in range(20)]  # polled concurrently; reader owns no reads
    for thread in threads:
        thread.join()
    assert failures == [] and all(n == [] for n in notifications)


def test_unknown_peer_and_stale_epoch_raise_stale_peer_error(owner: Owner, reader: Reader) -> None:
    assert reader.engine.has_peer("owner", 1) and not reader.engine.has_peer("owner", 2)
    with pytest.raises(StalePeerError, match="held at epoch 1") as info:
        reader.engine.read_blocks("owner", 2, [0], [0], deadline=in_seconds(5))
    assert info.value.epoch == 2 and info.value.local_blocks_reusable and not info.value.retriable
    with pytest.raises(StalePeerError, match="unknown"):
        reader.engine.read_blocks("nobody", 1, [0], [0], deadline=in_seconds(5))
    with pytest.raises(StalePeerError, match="older"):
        reader.engine.add_peer(dataclasses.replace(owner.metadata(), epoch=0))
    reader.engine.add_peer(owner.metadata())  # same (worker_id, epoch): no-op
    reader.engine.forget_peer("owner")
    with pytest.raises(StalePeerError, match="unknown"):
        reader.engine.read_blocks("owner", 1, [0], [0], deadline=in_seconds(5))


@pytest.mark.parametrize(
    ("remote", "local", "match"),
    [
        ([NUM_BLOCKS], [0], r"remote .* must be in \[0, 32\)"),
        ([-1], [0], r"remote .* must be in \[0, 32\)"),
        ([0], [NUM_BLOCKS], r"local block ids must be in \[0, 32\)"),
        ([0, 1], [0], "2 remote ids but 1 local"),
        ([0, 1], [5, 5], "distinct"),
        ([], [], "at least one block"),
        ([0.5], [0], "integers"),
    ],
)
def test_bad_ids_raise_before_anything_moves(owner: Owner, reader: Reader, remote, local, match) -> None:
    with pytest.raises(ValueError, match=match):
        reader.engine.read_blocks("owner", 1, remote, local, deadline=in_seconds(5), notification=b"bad")
    assert bool((reader.cache == -1.0).all())
    reader.engine.read_blocks("owner", 1, [1], [1], deadline=in_seconds(5), notification=b"good")
    assert owner.next_notification()[1] == b"good"  # the bad call posted nothing


def test_block_size_mismatch_raises_value_error(reader: Reader) -> None:
    other = TransferEngine("small-blocks", torch.zeros(4, 3), worker_id="small", epoch=1)
    try:
        reader.engine.add_peer(other.metadata())
        with pytest.raises(ValueError, match="bytes per block"):
            reader.engine.read_blocks("small", 1, [0], [0], deadline=in_seconds(5))
    finally:
        other.close()


def test_deadline_in_the_past_raises_timeout_promptly(reader: Reader) -> None:
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="deadline already passed") as info:
        reader.engine.read_blocks("owner", 1, [0, 1], [0, 1], deadline=start - 1.0, tag="req-late")
    assert time.monotonic() - start < 0.5
    assert info.value.retriable and info.value.local_blocks_reusable and info.value.tag == "req-late"
    assert bool((reader.cache == -1.0).all())
    assert reader.engine.reap_abandoned() == []


def test_newer_epoch_replaces_older_peer(reader: Reader) -> None:
    old = TransferEngine("peer-e1", owner_cache(seed=5), worker_id="peer", epoch=1)
    new_cache = owner_cache(seed=6)
    new = TransferEngine("peer-e2", new_cache, worker_id="peer", epoch=2)
    try:
        reader.engine.add_peer(old.metadata())
        reader.engine.add_peer(new.metadata())
        assert reader.engine.has_peer("peer", 2) and not reader.engine.has_peer("peer", 1)
        with pytest.raises(StalePeerError):
            reader.engine.read_blocks("peer", 1, [2], [2], deadline=in_seconds(5))
        reader.engine.read_blocks("peer", 2, [2], [2], deadline=in_seconds(5))
        assert torch.equal(reader.cache[2], new_cache[2])
    finally:
        old.close()
        new.close()


def test_killed_peer_raises_transfer_error_within_deadline(owners: dict[str, Owner], reader: Reader) -> None:
    doomed = owners["doomed"]
    reader.engine.add_peer(doomed.metadata())
    reader.engine.read_blocks("doomed", 1, [0], [0], deadline=in_seconds(5))
    os.kill(doomed.process.pid, signal.SIGKILL)
    doomed.process.join(timeout=5)
    start = time.monotonic()
    with pytest.raises(TransferError) as info:
        reader.engine.read_blocks("doomed", 1, [1, 2], [1, 2], deadline=start + 2.0)
    assert time.monotonic() - start < 2.5 and info.value.retriable
    assert "doomed" in str(info.value)
    late = TransferEngine("late-reader", torch.zeros(NUM_BLOCKS, 64), worker_id="late", epoch=1)
    try:  # a peer that died before we ever connected fails in add_peer: NIXL connects there
        with pytest.raises(TransferError, match="could not load or connect"):
            late.add_peer(doomed.metadata())
    finally:
        late.close()


def test_close_is_idempotent_and_final(owner: Owner) -> None:
    engine = TransferEngine("closing", allocate_kv_cache(SPEC, NUM_BLOCKS, CPU), worker_id="closing", epoch=1)
    engine.add_peer(owner.metadata())
    engine.close()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.read_blocks("owner", 1, [0], [0], deadline=in_seconds(5))
    with pytest.raises(RuntimeError, match="closed"):
        engine.poll_notifications()


def test_rejects_non_contiguous_cache() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        TransferEngine("strided", torch.zeros(8, 4, 2).transpose(0, 1), worker_id="x", epoch=1)


def test_owner_queue_has_no_stray_notifications(owner: Owner) -> None:
    with pytest.raises(queue.Empty):
        owner.next_notification(timeout=0.2)


def test_scattered_blocks_move_through_staging_with_one_descriptor() -> None:
    """Owner and reader in one process (staging logic, not IPC, is under test here)."""
    owner = TransferEngine("stage-owner", owner_cache(3), worker_id="stage-owner", epoch=1, staging_blocks=16, stage_min_runs=8)
    reader_cache = allocate_kv_cache(SPEC, NUM_BLOCKS, CPU)
    reader = TransferEngine("stage-reader", reader_cache, worker_id="stage-reader", epoch=1, staging_blocks=16,
                            stage_min_runs=8)
    try:
        reader.add_peer(owner.metadata())
        remote = [30, 2, 17, 5, 11, 23, 8, 14, 27, 0]  # ten runs: worth staging
        local = [1, 9, 20, 4, 31, 13, 6, 25, 18, 3]
        assert owner.stage(remote[:3]) is None  # three runs: cheaper as three descriptors
        slot = owner.stage(remote)
        assert slot is not None
        stats = reader.read_blocks("stage-owner", 1, remote, local, deadline=time.monotonic() + 10, remote_staged_at=slot)
        assert stats.num_descriptors == 1 and stats.num_blocks == len(remote)
        expected = owner_cache(3)
        for r, l in zip(remote, local):
            assert torch.equal(reader_cache[l], expected[r])
        untouched = sorted(set(range(NUM_BLOCKS)) - set(local))
        assert not reader_cache[untouched].any()
        assert reader._arena.num_free_slots == 16  # the reader's own staging slots came back
        owner.unstage(slot, len(remote))
        assert owner._arena.num_free_slots == 16
        with pytest.raises(ValueError, match="staging slots"):
            reader.read_blocks("stage-owner", 1, remote, local, deadline=time.monotonic() + 10, remote_staged_at=10)
    finally:
        reader.close()
        owner.close()


@pytest.mark.parametrize("count", [40, 600])  # below and above the switch to numpy
def test_coalesced_runs_cover_every_pair_once_and_are_maximal(count: int) -> None:
    gen = torch.Generator().manual_seed(count)
    remote = torch.randperm(2 * count, generator=gen)[:count].tolist()
    local = list(range(count))  # runs only where the remote ids happen to be adjacent too
    runs = coalesce_runs(remote, local)
    pairs = {(r + i, l + i) for r, l, n in runs for i in range(n)}
    assert pairs == set(zip(remote, local)) and sum(n for _, _, n in runs) == count
    ends = {(r + n, l + n) for r, l, n in runs}
    assert not ends & {(r, l) for r, l, _ in runs}  # no run continues another: maximal
