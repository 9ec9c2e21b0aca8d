"""A registered staging buffer that turns a scattered list of KV blocks into one contiguous run.

A NIXL READ pays per descriptor (about 6 us on GPUs, shared/gpu/README.md), so 4,096 scattered
blocks crawl at a few percent of NVLink speed while one 1.5 GB descriptor runs at full speed.
Copying scattered blocks into adjacent staging slots costs two passes over the bytes at HBM
speed (3 TB/s), far less. The owner gathers a handed-off prompt's blocks into its staging slots
when the handle is made; the reader READs that run with one descriptor, into its own staging
slots when its reserved blocks are scattered too, and scatters them into place.

Slots are handed out first-fit as contiguous runs; the allocator is thread-safe because reads
run on transfer threads while the engine thread stages and unstages.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from types import ModuleType

import torch


class StagingArena:
    """``num_slots`` slots of ``bytes_per_block`` bytes each, in one tensor on ``device``."""

    def __init__(self, num_slots: int, bytes_per_block: int, device: torch.device) -> None:
        if num_slots < 1 or bytes_per_block < 1:
            raise ValueError(f"staging needs >= 1 slot of >= 1 byte, got {num_slots} x {bytes_per_block}")
        self.buffer = torch.empty((num_slots, bytes_per_block), dtype=torch.uint8, device=device)
        self.num_slots = num_slots
        self._free_runs: list[tuple[int, int]] = [(0, num_slots)]  # (start, length), sorted by start
        self._lock = threading.Lock()

    @property
    def num_free_slots(self) -> int:
        with self._lock:
            return sum(length for _, length in self._free_runs)

    def allocate(self, count: int) -> int | None:
        """Start of ``count`` adjacent free slots, or None when no free run is long enough."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        with self._lock:
            for index, (start, length) in enumerate(self._free_runs):
                if length >= count:
                    if length == count:
                        del self._free_runs[index]
                    else:
                        self._free_runs[index] = (start + count, length - count)
                    return start
        return None

    def free(self, start: int, count: int) -> None:
        """Return a run from allocate(), merging it with free neighbours."""
        with self._lock:
            runs = self._free_runs
            index = 0
            while index < len(runs) and runs[index][0] < start:
                index += 1
            before = runs[index - 1] if index > 0 else None
            after = runs[index] if index < len(runs) else None
            if (before and before[0] + before[1] > start) or (after and start + count > after[0]):
                raise ValueError(f"staging slots {start}..{start + count - 1} are not allocated")
            if before and before[0] + before[1] == start:
                start, count = before[0], before[1] + count
                index -= 1
                del runs[index]
            if index < len(runs) and start + count == runs[index][0]:
                count += runs[index][1]
                del runs[index]
            runs.insert(index, (start, count))


def gather_into_slots(slots: torch.Tensor, rows: torch.Tensor, block_ids: Sequence[int]) -> None:
    """slots[i] = rows[block_ids[i]], landed when it returns (NIXL copies on its own CUDA streams)."""
    if rows.is_cuda:
        index = torch.tensor(list(block_ids), dtype=torch.long, device=rows.device)
        triton_kv = _triton_kv()
        if triton_kv is not None:  # one launch that streams whole rows; index_select moves elements
            triton_kv.gather_rows(as_words(slots), as_words(rows), index)
        else:
            torch.index_select(as_words(rows), 0, index, out=as_words(slots))
        torch.cuda.current_stream(rows.device).synchronize()
    else:  # torch's CPU index_select crawls over rows this long (ms for one 360 KiB row)
        for slot, block_id in enumerate(block_ids):
            slots[slot].copy_(rows[block_id])


def scatter_from_slots(rows: torch.Tensor, block_ids: Sequence[int], slots: torch.Tensor) -> None:
    """rows[block_ids[i]] = slots[i], landed when it returns."""
    if rows.is_cuda:
        index = torch.tensor(list(block_ids), dtype=torch.long, device=rows.device)
        triton_kv = _triton_kv()
        if triton_kv is not None:
            triton_kv.scatter_rows(as_words(rows), index, as_words(slots))
        else:
            as_words(rows).index_copy_(0, index, as_words(slots))
        torch.cuda.current_stream(rows.device).synchronize()
    else:
        for slot, block_id in enumerate(block_ids):
            rows[block_id].copy_(slots[slot])


@functools.cache
def _triton_kv() -> ModuleType | None:
    """tandem.kernels.triton_kv, or None where triton does not import (imported on first use)."""
    try:
        from tandem.kernels import triton_kv
    except ImportError:
        return None
    return triton_kv


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """Byte rows as 8-byte words where the size allows: GPU gather kernels move elements, and
    eight times fewer of them is that much faster."""
    return rows.view(torch.int64) if rows.shape[-1] % 8 == 0 else rows
