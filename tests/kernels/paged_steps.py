"""Random paged-attention steps for kernel tests: shuffled block tables over a real multi-layer cache."""
from __future__ import annotations

import torch

from tandem.kernels.interface import AttentionMetadata
from tandem.kvtransfer.kv_cache import KVCacheSpec, allocate_kv_cache, layer_views

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS = 3
LAYER = 1  # the layer under test, between two others, so its view is strided


def random_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cache of all layers, filled with random values; the per-layer view of LAYER)."""
    spec = KVCacheSpec(NUM_LAYERS, num_kv_heads, head_dim, block_size, dtype)
    full = allocate_kv_cache(spec, num_blocks, torch.device(DEVICE))
    full.copy_(torch.randn(full.shape, generator=gen).to(dtype))
    return full, layer_views(full)[LAYER]


def paged_step(
    cached_lens: list[int], query_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> AttentionMetadata:
    """A step appending query_lens[i] tokens after cached_lens[i], on DEVICE, over shuffled tables."""
    tables = shuffled_block_tables(cached_lens, query_lens, block_size, num_blocks, gen)
    return metadata_for(tables, cached_lens, query_lens, block_size, DEVICE)


def shuffled_block_tables(
    cached_lens: list[int], query_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> torch.Tensor:
    """Each sequence owns ceil(seq_len / block_size) shuffled, non-adjacent blocks; rows are padded
    with 0. [num_seqs, max_blocks] int32 on the CPU."""
    needed = [-(-(c + q) // block_size) for c, q in zip(cached_lens, query_lens)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    assert sum(needed) <= num_blocks
    table = torch.zeros(len(needed), max(needed), dtype=torch.int32)
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    return table


def metadata_for(
    block_tables: torch.Tensor, cached_lens: list[int], query_lens: list[int], block_size: int, device: str | torch.device
) -> AttentionMetadata:
    """Metadata, on ``device``, of a step that appends query_lens[i] tokens after cached_lens[i]."""
    seq_lens = [c + q for c, q in zip(cached_lens, query_lens)]
    slots = [
        int(block_tables[i, pos // block_size]) * block_size + pos % block_size
        for i, (cached, seq_len) in enumerate(zip(cached_lens, seq_lens))
        for pos in range(cached, seq_len)
    ]
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        block_size=block_size,
    )
