"""The KV-cache tensor of one worker: its layout, its size, and per-layer views of it.

Owns the one tensor that holds every layer's keys and values, allocated once at
start and never grown; the block pool (:mod:`tandem.kvtransfer.block_pool`) hands
out indices into its first dimension.

Layout, block-major::

    kv_cache: [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]

One block of ALL layers, ``kv_cache[b]``, is then a single contiguous region of
``KVCacheSpec.bytes_per_block`` bytes. NIXL registers the whole tensor once, and a
transfer of n blocks needs n descriptors (fewer when block ids are adjacent),
not n * num_layers as a layer-major layout would. Attention backends take the
strided per-layer view ``kv_cache[:, layer]`` ([num_blocks, 2, block_size,
num_kv_heads, head_dim], block stride = num_layers * 2 * block_size * heads *
head_dim elements): paged kernels index pages through a stride (FlashInfer
accepts a non-contiguous paged cache with a page stride), so nothing is copied.
"""

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape and dtype of the KV cache; block_size is in tokens."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        sizes = {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"KVCacheSpec.{name} must be >= 1, got {value}")

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V: the unit a transfer moves."""
        elements = 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
        return elements * self.dtype.itemsize


def _total_memory(device: torch.device) -> int:
    """Total memory of the device: GPU memory on CUDA, else physical RAM."""
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        return total
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def num_blocks_for_budget(
    spec: KVCacheSpec,
    *,
    num_bytes: int | None = None,
    memory_fraction: float | None = None,
    device: torch.device,
) -> int:
    """Blocks that fit in ``num_bytes``, or in ``memory_fraction`` of the device's total memory.

    Exactly one of the two must be given. Raises ValueError if the budget is
    smaller than one block.
    """
    if (num_bytes is None) == (memory_fraction is None):
        raise ValueError("give exactly one of num_bytes and memory_fraction")
    if memory_fraction is not None:
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        num_bytes = int(_total_memory(device) * memory_fraction)
    assert num_bytes is not None
    num_blocks = num_bytes // spec.bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV-cache budget of {num_bytes} bytes is smaller than one block "
            f"({spec.bytes_per_block} bytes for {spec})"
        )
    return num_blocks


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    """The zero-filled KV cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    shape = (num_blocks, spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return torch.zeros(shape, dtype=spec.dtype, device=device)


def layer_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-layer views ``kv_cache[:, layer]``: [num_blocks, 2, block_size, num_kv_heads, head_dim], strided."""
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            "expected [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    return tuple(kv_cache[:, layer] for layer in range(kv_cache.shape[1]))
