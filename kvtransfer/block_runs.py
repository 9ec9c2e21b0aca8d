"""Runs of adjacent KV block ids: what one NIXL descriptor can move, and id validation.

A transfer pays per descriptor, so pairs of (remote, local) block ids whose both sides step by
one are merged into one run. Pure functions, no NIXL, no torch: unit-tested on their own.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

_NUMPY_FROM = 256  # ids from which numpy beats a Python loop


def coalesce_runs(remote_ids: Sequence[int], local_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(remote_start, local_start, length) runs where both ids step by one.

    Pairs are sorted by remote id first (the order of pairs does not matter to a transfer), so
    ``remote [5, 4] -> local [1, 0]`` is one run ``(4, 0, 2)``. A Python loop for short lists,
    numpy from ``_NUMPY_FROM`` ids on: each is the faster there (a few us against ~1 ms at 4096).
    """
    if len(remote_ids) != len(local_ids):
        raise ValueError(f"{len(remote_ids)} remote ids but {len(local_ids)} local ids")
    if len(remote_ids) >= _NUMPY_FROM:
        remote, local = np.asarray(remote_ids, dtype=np.int64), np.asarray(local_ids, dtype=np.int64)
        order = np.argsort(remote, kind="stable")
        remote, local = remote[order], local[order]
        starts = np.flatnonzero(np.concatenate(([True], (np.diff(remote) != 1) | (np.diff(local) != 1))))
        lengths = np.diff(np.append(starts, len(remote)))
        return list(zip(remote[starts].tolist(), local[starts].tolist(), lengths.tolist()))
    runs: list[list[int]] = []
    for remote, local in sorted(zip(remote_ids, local_ids)):
        last = runs[-1] if runs else None
        if last is not None and remote == last[0] + last[2] and local == last[1] + last[2]:
            last[2] += 1
        else:
            runs.append([remote, local, 1])
    return [(r, l, n) for r, l, n in runs]


def num_runs(ids: Sequence[int]) -> int:
    """Runs of consecutive ids, in list order (staging keeps the order)."""
    return sum(1 for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1] + 1)


def checked_ids(ids: Sequence[int], num_blocks: int, side: str) -> list[int]:
    try:
        ids = [operator.index(i) for i in ids]
    except TypeError:
        raise ValueError(f"{side} block ids must be integers") from None
    if min(ids) < 0 or max(ids) >= num_blocks:
        raise ValueError(f"{side} block ids must be in [0, {num_blocks}), got {min(ids)}..{max(ids)}")
    return ids


def checked_id_pairs(
    remote_ids: Sequence[int], local_ids: Sequence[int], remote_num_blocks: int, local_num_blocks: int, remote: str
) -> tuple[list[int], list[int]]:
    """Both id lists of a READ as ints, validated against both caches; ValueError before anything moves."""
    if len(remote_ids) != len(local_ids):
        raise ValueError(f"{len(remote_ids)} remote ids but {len(local_ids)} local ids")
    if len(remote_ids) == 0:
        raise ValueError("read_blocks needs at least one block")
    remote_checked = checked_ids(remote_ids, remote_num_blocks, f"remote ({remote})")
    local_checked = checked_ids(local_ids, local_num_blocks, "local")
    if len(set(local_checked)) != len(local_checked):
        raise ValueError("local block ids must be distinct")
    return remote_checked, local_checked
