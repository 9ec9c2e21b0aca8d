"""KV handles and the leases that pin their blocks on the worker that computed them.

A context worker that hands a prompt's KV off keeps the blocks allocated under a lease until the
generation worker releases it after its READ (the answer tells the reader whether the lease was
still live, so whether it read the lease's bytes), a router releases the handle, or the lease
deadline passes; a reader's NIXL notification acknowledging its READ ends one too. Expiry is the
backstop that makes a dead or slow peer harmless: the blocks come back and a counter says how
often it happened. A handle names the worker and its epoch; one from another worker or another
epoch (a restart) is refused, never served with stale blocks.

Deadlines are wall-clock (``time.time``) because they travel between hosts inside the handle;
the generation side finishes its READ a safety margin before the deadline (see workers/worker.py).
No locks: one thread (the worker's engine loop) owns a LeaseTable.
"""
from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

HANDLE_MEMORY = 65_536  # ended handle ids remembered, to tell "already ended" from "never issued"


class TransferMode(enum.Enum):
    READ = "read"  # the generation worker READs the blocks from their owner
    PUSH = "push"  # reserved: the owner WRITEs into blocks the generation worker reserved


@dataclass(frozen=True, slots=True)
class KVHandle:
    """Where a prompt's KV lives and until when it stays there."""

    handle_id: str
    worker_id: str
    epoch: int
    agent_name: str  # the owner's NIXL agent
    address: str  # the owner's gRPC target: transfer metadata and Release
    block_ids: tuple[int, ...]
    num_tokens: int
    lease_deadline: float  # time.time() seconds; the blocks may be reused after it
    mode: TransferMode = TransferMode.READ
    staging_offset: int | None = None  # the owner staged block_ids[i] at its staging slot offset + i


class LeaseError(Exception):
    """A handle this worker cannot honour; the message says why."""


class StaleHandleError(LeaseError):
    """The handle names another worker or another epoch of this one."""

    retriable = True  # the request itself can be prefilled again, elsewhere or here


class UnknownHandleError(LeaseError):
    """This worker never issued the handle."""


class HandleMismatchError(LeaseError):
    """The handle's id is a live lease's, but not its blocks, token count or staging slots."""


@dataclass(slots=True)
class _Lease:
    handle: KVHandle
    request_id: str


class LeaseTable:
    """Leases of one worker epoch, keyed by handle id."""

    def __init__(
        self, worker_id: str, epoch: int, agent_name: str, address: str, lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.worker_id = worker_id
        self.epoch = epoch
        self.agent_name = agent_name
        self.address = address
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._next_id = 0
        self.num_expired = 0
        self.num_acknowledged = 0

    @property
    def num_active(self) -> int:
        return len(self._leases)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(lease.handle.block_ids) for lease in self._leases.values())

    def grant(
        self, request_id: str, block_ids: tuple[int, ...], num_tokens: int, staging_offset: int | None = None
    ) -> KVHandle:
        """Pin block_ids (already allocated by the caller) and return the handle naming them."""
        self._next_id += 1
        handle = KVHandle(
            handle_id=f"{self.worker_id}/{self.epoch}/{self._next_id}",
            worker_id=self.worker_id,
            epoch=self.epoch,
            agent_name=self.agent_name,
            address=self.address,
            block_ids=block_ids,
            num_tokens=num_tokens,
            lease_deadline=self._clock() + self.lease_seconds,
            staging_offset=staging_offset,
        )
        self._leases[handle.handle_id] = _Lease(handle, request_id)
        return handle

    def check(self, worker_id: str, epoch: int) -> None:
        """Raise StaleHandleError unless (worker_id, epoch) is this table's."""
        if worker_id != self.worker_id:
            raise StaleHandleError(f"handle belongs to worker {worker_id!r}, this is {self.worker_id!r}")
        if epoch != self.epoch:
            raise StaleHandleError(
                f"handle is from epoch {epoch} of worker {worker_id!r}, which restarted (epoch now {self.epoch}):"
                " its blocks are gone"
            )

    def end(self, handle_id: str) -> KVHandle | None:
        """Acknowledge or release a lease: its handle, whose blocks (and staging slots) the caller
        frees; None if it had already ended. Raises UnknownHandleError for an id never issued."""
        lease = self._leases.pop(handle_id, None)
        if lease is None:
            if handle_id in self._ended:
                return None
            raise UnknownHandleError(f"no KV handle {handle_id!r} on worker {self.worker_id!r} epoch {self.epoch}")
        self._remember_ended(handle_id)
        return lease.handle

    def release(self, handle: KVHandle) -> KVHandle | None:
        """end() for a handle a caller sends back: it must be of this worker and epoch (else
        StaleHandleError) and, while its lease lives, name the lease's blocks, tokens and staging
        slots (else HandleMismatchError, and the lease lives on). A reader that READ the blocks
        the handle names learns here whether they were the lease's, pinned all along."""
        self.check(handle.worker_id, handle.epoch)
        lease = self._leases.get(handle.handle_id)
        if lease is not None and _contents(handle) != _contents(lease.handle):
            raise HandleMismatchError(
                f"handle {handle.handle_id!r} names {_describe(handle)}, but its lease holds {_describe(lease.handle)}"
            )
        return self.end(handle.handle_id)

    def acknowledge(self, handle_id: str) -> KVHandle | None:
        """The peer finished its READ: like end(), counted, and silent about unknown ids (a
        notification from a peer is not an API call that could be answered with an error)."""
        try:
            handle = self.end(handle_id)
        except UnknownHandleError:
            return None
        if handle is not None:
            self.num_acknowledged += 1
        return handle

    def expire(self) -> list[KVHandle]:
        """End every lease past its deadline; returns their handles for the caller to free."""
        now = self._clock()
        expired = [hid for hid, lease in self._leases.items() if lease.handle.lease_deadline <= now]
        self.num_expired += len(expired)
        return [handle for hid in expired if (handle := self.end(hid)) is not None]

    def handles_of_request(self, request_id: str) -> list[str]:
        return [hid for hid, lease in self._leases.items() if lease.request_id == request_id]

    def _remember_ended(self, handle_id: str) -> None:
        self._ended[handle_id] = None
        if len(self._ended) > HANDLE_MEMORY:
            self._ended.popitem(last=False)


def _contents(handle: KVHandle) -> tuple:
    return tuple(handle.block_ids), handle.num_tokens, handle.staging_offset


def _describe(handle: KVHandle) -> str:
    ids = handle.block_ids
    shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
    staged = "" if handle.staging_offset is None else f", staged at {handle.staging_offset}"
    return f"{handle.num_tokens} tokens in blocks [{shown}]{staged}"
