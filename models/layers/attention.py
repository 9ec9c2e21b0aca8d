"""The paged-attention call of one decoder layer: store the new keys/values, then attend.

Owns no weights and no cache: the projections live in the model's attention block, the cache and
the backend arrive in the ForwardContext, so one model runs over any backend.
"""
from __future__ import annotations

import torch
from torch import nn

from tandem.kernels.interface import ForwardContext


class Attention(nn.Module):
    """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads, head_dim] of this rank."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        kv_cache = ctx.kv_caches[self.layer_idx]  # [num_blocks, 2, block_size, kv_heads, head_dim]
        ctx.backend.store_kv(kv_cache, k, v, ctx.meta)
        return ctx.backend.attend(q, kv_cache, ctx.meta, self.scale)
