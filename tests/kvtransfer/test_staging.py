"""The staging arena's allocator: contiguous first-fit runs, merged when freed, never double-freed."""
import pytest
import torch

from tandem.kvtransfer.staging import StagingArena


def test_runs_are_contiguous_first_fit_and_merge_back() -> None:
    arena = StagingArena(10, 8, torch.device("cpu"))
    assert arena.buffer.shape == (10, 8)
    a, b, c = arena.allocate(3), arena.allocate(4), arena.allocate(3)
    assert (a, b, c) == (0, 3, 7) and arena.num_free_slots == 0
    assert arena.allocate(1) is None
    arena.free(a, 3)
    arena.free(c, 3)
    assert arena.allocate(4) is None  # 6 slots free, but in two runs of 3
    arena.free(b, 4)  # merges both neighbours
    assert arena.num_free_slots == 10 and arena.allocate(10) == 0


def test_freeing_what_is_not_allocated_is_refused() -> None:
    arena = StagingArena(8, 4, torch.device("cpu"))
    start = arena.allocate(4)
    arena.free(start, 4)
    with pytest.raises(ValueError, match="not allocated"):
        arena.free(start, 4)
    with pytest.raises(ValueError):
        arena.allocate(0)
