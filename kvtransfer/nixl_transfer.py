"""The NIXL transfer engine of one worker: registers its KV cache, reads peers' KV blocks into it.

Owns one NIXL agent (UCX backend) and the registration of the worker's whole KV-cache tensor
(:mod:`tandem.kvtransfer.kv_cache`, block-major, so block ``b`` of all layers is one contiguous
region of ``bytes_per_block`` bytes at ``base + b * bytes_per_block``). The block owner
publishes :class:`PeerMetadata`; a reader ``add_peer``s it and ``read_blocks`` pulls blocks with
one NIXL READ, whose optional notification tells the owner the read finished.

Life cycle::

    TransferEngine(...) -> metadata() / add_peer() -> read_blocks()* / poll_notifications()* -> close()

Descriptors. A READ costs about 6 us per descriptor on GPUs (shared/gpu/README.md: 4096 x 64 KiB
blocks reach 8-11 GB/s against 380 GB/s for one 256 MiB region), so ``read_blocks`` coalesces
pairs whose remote AND local ids are both consecutive into one descriptor (``coalesce_runs``).
Blocks scattered over many runs go through staging slots (kvtransfer/staging.py): the owner
gathers them with ``stage`` when it makes the handle, the reader READs one descriptor (into its
own slots, then scatters, when its blocks are scattered too). Workers turn staging on by default
on GPUs only: on the CPU (UCX picks cma, process_vm_readv) a descriptor is cheap next to the copy
itself and staging would add two memory copies. A tensor-parallel worker (``sharded``) always
stages, both ways: its slots hold whole wire blocks gathered from or scattered to its ranks
(kvtransfer/wire_blocks.py), and it advertises ``base_address`` 0, nothing readable in place.

Progress. NIXL's own progress thread polls UCX without pause (``pthrDelay`` 0): a whole core per
worker, even idle. It is off; our thread drives UCX through ``get_new_notifs`` every
``PROGRESS_INTERVAL_S`` instead (a peer's connection and its notifications need the owner to
progress; a READ's data does not), and ``read_blocks`` progresses its own transfer while it waits.

Thread safety. The agent is created with ``NIXL_THREAD_SYNC_RW``: the C++ agent then guards its
own tables with a shared lock for post / status / release / notifications (so transfers on
different handles run concurrently) and an exclusive one for loading or dropping a peer, and the
UCX backend runs its workers in multi-thread mode. (The default, ``NIXL_THREAD_SYNC_NONE``
without a listener thread, has no lock at all in the agent: concurrent calls would race.) The
Python wrapper's own state is read-only after start, and each read uses its own handle. A
``threading.Lock`` here guards only our tables (peers, abandoned handles, notifications); it is never held
during a post, a poll or a sleep. This matters on CPU: UCX copies over cma (process_vm_readv)
inside the post call itself (about 0.1 s for 256 MiB, with the GIL released), so a lock around
agent calls would serialize every reader and stall ``poll_notifications``. The same fact means
a CPU read can overrun its deadline by the length of one post. Hence ``read_blocks`` may run in
many threads at once, concurrently with ``poll_notifications``, ``add_peer`` and
``reap_abandoned``. Replacing a peer (newer epoch) or ``forget_peer`` while a read from it is
in flight makes that read fail with TransferError. ``close`` must not race with other calls.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

from tandem.kvtransfer.block_runs import checked_id_pairs, coalesce_runs, num_runs
from tandem.kvtransfer.staging import StagingArena
from tandem.kvtransfer.transfer_types import (  # noqa: F401  (re-exported: the transfer API)
    PeerMetadata,
    StalePeerError,
    TransferError,
    TransferStats,
    TransferTimeout,
)
from tandem.kvtransfer.wire_blocks import ShardedBlocks, WireRows

# Stage when a block list has more runs than this: on GPUs a descriptor costs ~6 us, a staging
# copy of a few MiB about 10-20 us of launches and HBM traffic; measured on two H200s, staging
# beats direct descriptors from about 32 scattered blocks on (docs/performance.md).
STAGE_MIN_RUNS = 32
PROGRESS_INTERVAL_S = 2e-3
_SPIN_S = 200e-6  # poll without sleeping this long: a sleep costs ~60 us more than asked
_MIN_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3


@dataclass(frozen=True, slots=True)
class _Peer:
    meta: PeerMetadata
    remote_name: str  # as NIXL knows the agent


class TransferEngine:
    """One worker's NIXL agent over its registered KV cache (see the module docstring)."""

    def __init__(
        self, agent_name: str, kv_cache: torch.Tensor, *, worker_id: str, epoch: int, num_threads: int = 0,
        staging_blocks: int = 0, stage_min_runs: int = STAGE_MIN_RUNS, sharded: ShardedBlocks | None = None,
    ) -> None:
        if kv_cache.dim() < 2 or kv_cache.shape[0] < 1 or kv_cache.numel() == 0:
            raise ValueError(f"kv_cache must be [num_blocks, ...] with num_blocks >= 1, got {tuple(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous: NIXL registers it as one region")
        self._kv_cache = kv_cache  # keeps the registered memory alive
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        # (tag, nixl xfer handle, staging run it may still write or None)
        self._abandoned: list[tuple[str, object, tuple[int, int] | None]] = []
        self._tags = itertools.count()
        self._closed = False
        self._notifications: list[tuple[str, bytes]] = []
        self._stop_progress = threading.Event()
        self.worker_id, self.epoch = worker_id, epoch
        self.memory_type = "VRAM" if kv_cache.is_cuda else "DRAM"
        self.device_id = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
        self.num_blocks = kv_cache.shape[0]
        # A tensor-parallel worker's cache holds a share of the heads: it moves whole wire blocks
        # (kvtransfer/wire_blocks.py) through staging slots only, never a block in place.
        self._wire = WireRows(kv_cache, sharded)
        self.reads_in_place = self._wire.in_place  # False: peers can READ only staged handles
        if not self._wire.in_place and staging_blocks < 1:
            raise ValueError("a worker whose KV cache holds a share of the kv heads needs staging_blocks >= 1")
        self.bytes_per_block = self._wire.bytes_per_block
        rw = nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
        if num_threads > 0:
            self._agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, backends=[], sync_mode=rw))
            self._agent.create_backend("UCX", {"num_threads": str(num_threads)})
        else:
            self._agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"], sync_mode=rw))
        if "UCX" not in self._agent.backends:
            raise RuntimeError("NIXL UCX backend is not available")
        self.stage_min_runs = stage_min_runs
        self._arena = StagingArena(staging_blocks, self.bytes_per_block, kv_cache.device) if staging_blocks > 0 else None
        base_address = kv_cache.data_ptr() if self._wire.in_place else 0  # 0: no block is read in place
        regions = [(base_address, self.num_blocks * self.bytes_per_block, self.device_id, "")] if base_address else []
        if self._arena is not None:
            regions.append((self._arena.buffer.data_ptr(), self._arena.buffer.numel(), self.device_id, ""))
        self._registration = self._agent.register_memory(regions, self.memory_type)
        self._metadata = PeerMetadata(
            worker_id=worker_id, epoch=epoch, agent_name=agent_name,
            agent_metadata=self._agent.get_agent_metadata(), base_address=base_address,
            bytes_per_block=self.bytes_per_block, num_blocks=self.num_blocks,
            memory_type=self.memory_type, device_id=self.device_id,
            staging_address=self._arena.buffer.data_ptr() if self._arena else 0,
            staging_slots=self._arena.num_slots if self._arena else 0,
        )
        self._progress_thread = threading.Thread(target=self._progress, name=f"nixl-progress-{agent_name}", daemon=True)
        self._progress_thread.start()

    def metadata(self) -> PeerMetadata:
        return self._metadata

    def add_peer(self, peer: PeerMetadata) -> None:
        """Load a peer's agent; a newer epoch replaces the older, the same (worker_id, epoch) is a no-op.

        NIXL connects here (UCX endpoint), so an unreachable peer raises TransferError now.
        An older epoch than the one held raises StalePeerError.
        """
        with self._lock:
            self._check_open()
            held = self._peers.get(peer.worker_id)
            if held is not None and held.meta.epoch == peer.epoch:
                return
            if held is not None and held.meta.epoch > peer.epoch:
                raise StalePeerError(
                    f"peer {peer.worker_id} epoch {peer.epoch} is older than the held epoch {held.meta.epoch}",
                    worker_id=peer.worker_id, epoch=peer.epoch, retriable=False, local_blocks_reusable=True,
                )
            for other in self._peers.values():
                if other.meta.worker_id != peer.worker_id and other.meta.agent_name == peer.agent_name:
                    raise ValueError(f"agent name {peer.agent_name!r} is already used by peer {other.meta.worker_id}")
            if held is not None:
                self._peers.pop(peer.worker_id)
                self._drop_remote(held.remote_name)
            try:
                name = self._agent.add_remote_agent(peer.agent_metadata)
            except Exception as e:
                raise TransferError(
                    f"could not load or connect to peer {peer.worker_id} epoch {peer.epoch} ({peer.agent_name}): {e}",
                    worker_id=peer.worker_id, epoch=peer.epoch, retriable=True, local_blocks_reusable=True,
                ) from e
            name = name.decode() if isinstance(name, bytes) else name
            if name != peer.agent_name:
                self._drop_remote(name)
                raise ValueError(f"peer metadata names agent {name!r}, expected {peer.agent_name!r}")
            self._peers[peer.worker_id] = _Peer(peer, name)

    def has_peer(self, worker_id: str, epoch: int) -> bool:
        with self._lock:
            held = self._peers.get(worker_id)
            return held is not None and held.meta.epoch == epoch

    def forget_peer(self, worker_id: str) -> None:
        with self._lock:
            held = self._peers.pop(worker_id, None)
            if held is not None and not self._closed:
                self._drop_remote(held.remote_name)

    def stage(self, block_ids: Sequence[int]) -> int | None:
        """Owner side: gather blocks into adjacent staging slots when they are scattered enough for
        one descriptor to beat many; returns the first slot (block_ids[i] is at slot + i), or None
        (no staging, too few runs to pay, or no room) and the blocks are read where they are.
        A sharded worker always stages; None (no room) then leaves its blocks unreadable."""
        if self._arena is None or (self._wire.in_place and num_runs(block_ids) <= self.stage_min_runs):
            return None
        slot = self._arena.allocate(len(block_ids))
        if slot is None:
            return None
        self._wire.pack(block_ids, self._arena.buffer[slot : slot + len(block_ids)])
        return slot

    def unstage(self, slot: int, count: int) -> None:
        """Give back staging slots from stage() (the lease that needed them ended)."""
        assert self._arena is not None, "unstage without a staging arena"
        self._arena.free(slot, count)

    def read_blocks(
        self, worker_id: str, epoch: int, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
        *, deadline: float, notification: bytes = b"", tag: str = "", remote_staged_at: int | None = None,
    ) -> TransferStats:
        """READ remote blocks into local blocks, blocking until done or ``deadline`` (time.monotonic()).

        With ``remote_staged_at`` the owner has staged remote_block_ids[i] at its staging slot
        remote_staged_at + i: one descriptor reads them all, into our own staging slots first when
        the local blocks are scattered or sharded (then unpacked into place). Raises ValueError (nothing
        moved) for bad ids, StalePeerError for an unknown peer or epoch, TransferError when NIXL
        reports an error, TransferTimeout at the deadline. After a timeout with
        ``local_blocks_reusable=False`` the transfer is kept under ``tag`` (the exception's tag)
        until ``reap_abandoned`` returns it.
        """
        start = time.perf_counter()
        tag = tag or f"{worker_id}:{epoch}:{next(self._tags)}"
        peer = self._peer(worker_id, epoch, tag)
        meta = peer.meta
        if meta.bytes_per_block != self.bytes_per_block:
            raise ValueError(f"peer {worker_id} has {meta.bytes_per_block} bytes per block, we have {self.bytes_per_block}")
        remote_ids, local_ids = checked_id_pairs(remote_block_ids, local_block_ids, meta.num_blocks, self.num_blocks, worker_id)
        count = len(local_ids)
        remote_region = (meta.base_address, remote_ids)
        if remote_staged_at is not None:
            if not 0 <= remote_staged_at <= meta.staging_slots - count:
                raise ValueError(f"staging slots {remote_staged_at}+{count} out of the {meta.staging_slots} of {worker_id}")
            remote_region = (meta.staging_address, list(range(remote_staged_at, remote_staged_at + count)))
        elif meta.base_address == 0:
            raise ValueError(f"{worker_id} reads no block in place (its cache holds a share of the kv heads) and "
                             "this handle's blocks are not staged")
        local_slot = None
        if not self._wire.in_place:
            local_slot = self._arena.allocate(count)
            if local_slot is None:
                raise TransferError(f"no {count} free staging slots to READ into; tag {tag!r}", worker_id=worker_id,
                                    epoch=epoch, tag=tag, retriable=True, local_blocks_reusable=True)
        elif remote_staged_at is not None and self._arena is not None and num_runs(local_ids) > self.stage_min_runs:
            local_slot = self._arena.allocate(count)  # None: no room, READ straight into the blocks
        local_region = (self._metadata.base_address, local_ids)
        if local_slot is not None:
            local_region = (self._arena.buffer.data_ptr(), list(range(local_slot, local_slot + count)))
        try:
            num_descriptors = self._read(peer, remote_region, local_region, deadline, notification, tag, local_slot, count)
        except TransferError as error:
            if local_slot is not None and error.local_blocks_reusable:
                self._arena.free(local_slot, count)
            if local_slot is not None:
                error.local_blocks_reusable = True  # a late write lands in staging slots, not in the blocks
            raise
        if local_slot is not None:
            try:
                self._wire.unpack(self._arena.buffer[local_slot : local_slot + count], local_ids)
            finally:
                self._arena.free(local_slot, count)
        return TransferStats(count, num_descriptors, count * self.bytes_per_block, time.perf_counter() - start)

    def _read(
        self, peer: _Peer, remote_region: tuple[int, list[int]], local_region: tuple[int, list[int]],
        deadline: float, notification: bytes, tag: str, local_slot: int | None, count: int,
    ) -> int:
        """Post one READ of the coalesced (remote, local) runs and wait for it; returns the number
        of descriptors. ``*_region`` is (base address, slot index of each block)."""
        (remote_base, remote_slots), (local_base, local_slots) = remote_region, local_region
        runs = coalesce_runs(remote_slots, local_slots)
        bpb = self.bytes_per_block
        local = self._agent.get_xfer_descs([(local_base + l * bpb, n * bpb, self.device_id) for _, l, n in runs], self.memory_type)
        remote = self._agent.get_xfer_descs(
            [(remote_base + r * bpb, n * bpb, peer.meta.device_id) for r, _, n in runs], peer.meta.memory_type
        )

        def error(cls: type[TransferError], what: str, reusable: bool) -> TransferError:
            msg = (f"READ of {count} blocks from {peer.meta.worker_id} epoch {peer.meta.epoch} ({peer.remote_name}) "
                   f"{what}; deadline {deadline - time.monotonic():+.3f} s from now, tag {tag!r}")
            return cls(msg, worker_id=peer.meta.worker_id, epoch=peer.meta.epoch, tag=tag, retriable=True,
                       local_blocks_reusable=reusable)

        if time.monotonic() >= deadline:
            raise error(TransferTimeout, "not posted: deadline already passed", True)
        try:
            handle = self._agent.initialize_xfer("READ", local, remote, peer.remote_name, notification)
        except Exception as e:
            raise error(TransferError, f"could not be created ({e})", True) from e
        try:
            state = self._agent.transfer(handle)
        except Exception:  # reported as ERR below, after releasing the handle
            state = "ERR"
        sleep = _MIN_SLEEP_S
        spin_until = time.monotonic() + _SPIN_S
        staging_run = (local_slot, count) if local_slot is not None else None
        while state == "PROC":
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                reusable = self._release_or_abandon(handle, tag, staging_run)
                raise error(TransferTimeout, "timed out" + ("" if reusable else ", could not cancel it"), reusable)
            if now > spin_until:  # a GPU READ of a few MiB is done in tens of microseconds: spin first
                time.sleep(min(sleep, remaining))
                sleep = min(sleep * 2, _MAX_SLEEP_S)
            state = self._agent.check_xfer_state(handle)
        if state != "DONE":
            reusable = self._release_or_abandon(handle, tag, staging_run)
            raise error(TransferError, "failed (NIXL state ERR)", reusable)
        self._agent.release_xfer_handle(handle)
        return len(runs)

    def reap_abandoned(self) -> list[str]:
        """Tags of abandoned transfers now released: their local blocks are safe to reuse again."""
        reaped, kept = [], []
        with self._lock:
            for tag, handle, staging_run in self._abandoned:
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception:
                    kept.append((tag, handle, staging_run))
                    continue
                reaped.append(tag)
                if staging_run is not None:
                    self._arena.free(*staging_run)
            self._abandoned = kept
        return reaped

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """(peer agent name, message) for each READ of our blocks that finished since the last poll."""
        self._check_open()
        with self._lock:
            notifications, self._notifications = self._notifications, []
        return notifications

    def _progress(self) -> None:
        """Our progress thread (see the module docstring): drive UCX every PROGRESS_INTERVAL_S,
        so that peers can connect and notify while the owner's engine is busy with a long step."""
        while not self._stop_progress.wait(PROGRESS_INTERVAL_S):
            try:
                notifs = self._agent.get_new_notifs()
            except Exception:  # closing under us; the loop ends at the next wait
                continue
            if notifs:
                with self._lock:
                    self._notifications.extend((name, msg) for name, msgs in notifs.items() for msg in msgs)

    def close(self) -> None:
        """Drop peers, release abandoned transfers where possible, deregister memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_progress.set()
        self._progress_thread.join(timeout=1.0)
        with self._lock:
            for _tag, handle, _staging_run in self._abandoned:
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception:
                    pass
            self._abandoned = []
            for peer in self._peers.values():
                self._drop_remote(peer.remote_name)
            self._peers.clear()
            self._agent.deregister_memory(self._registration)
            self._agent = None  # the C++ agent (UCX workers) goes with the last reference

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TransferEngine of {self.worker_id} epoch {self.epoch} is closed")

    def _peer(self, worker_id: str, epoch: int, tag: str) -> _Peer:
        with self._lock:
            self._check_open()
            held = self._peers.get(worker_id)
        if held is None or held.meta.epoch != epoch:
            have = "unknown" if held is None else f"held at epoch {held.meta.epoch}"
            raise StalePeerError(
                f"no handle for peer {worker_id} epoch {epoch} ({have}); tag {tag!r}",
                worker_id=worker_id, epoch=epoch, tag=tag, retriable=False, local_blocks_reusable=True,
            )
        return held

    def _drop_remote(self, remote_name: str) -> None:
        """Forget a remote agent; a peer that is already gone may make NIXL complain, which is fine."""
        try:
            self._agent.remove_remote_agent(remote_name)
        except Exception:
            pass

    def _release_or_abandon(self, handle: object, tag: str, staging_run: tuple[int, int] | None) -> bool:
        """Release (cancel) a handle; if NIXL refuses, keep it under tag. True when released."""
        try:
            self._agent.release_xfer_handle(handle)
            return True
        except Exception:
            with self._lock:
                self._abandoned.append((tag, handle, staging_run))
            return False
