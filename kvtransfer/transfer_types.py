"""What a transfer engine tells its peers and callers: peer metadata, errors, statistics.

Plain values, no NIXL and no torch, so that the gRPC layer and the tests can use them without
an agent.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PeerMetadata:
    """What a peer needs to READ our KV blocks; plain fields so it can travel over gRPC."""

    worker_id: str
    epoch: int
    agent_name: str
    agent_metadata: bytes  # nixl get_agent_metadata()
    base_address: int  # kv_cache.data_ptr()
    bytes_per_block: int
    num_blocks: int
    memory_type: str  # "DRAM" or "VRAM"
    device_id: int
    staging_address: int = 0  # the owner's staging slots (kvtransfer/staging.py); 0: none
    staging_slots: int = 0


class TransferError(RuntimeError):
    """A read failed. ``local_blocks_reusable`` is False when the read may still write them later."""

    def __init__(
        self, message: str, *, worker_id: str, epoch: int, tag: str = "",
        retriable: bool, local_blocks_reusable: bool,
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.epoch = epoch
        self.tag = tag
        self.retriable = retriable
        self.local_blocks_reusable = local_blocks_reusable


class TransferTimeout(TransferError):
    """The deadline passed before the read finished."""


class StalePeerError(TransferError):
    """The peer is unknown, or known under another epoch than the one asked for."""


@dataclass(frozen=True, slots=True)
class TransferStats:
    """One finished read; seconds is the wall time of the whole read_blocks call."""

    num_blocks: int
    num_descriptors: int
    num_bytes: int
    seconds: float
