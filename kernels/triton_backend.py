"""The Triton attention backend: Triton KV store and paged decode, torch reference for prefill.

Decode dominates a generation worker's attention time and is where the torch reference pays
most (it copies every sequence's whole context into a padded tensor each layer); the Triton
decode kernel reads the blocks in place. Steps that contain a prefill go through the torch
reference's per-sequence path, which is correct for any mix of prefill, chunked prefill and
decode; a Triton prefill kernel can replace it behind this class later.

Importing this module imports triton.
"""
from __future__ import annotations

import torch

from tandem.kernels.interface import AttentionMetadata, BackendKind
from tandem.kernels.torch_reference import TorchReferenceBackend
from tandem.kernels.triton_attention import paged_decode_attention
from tandem.kernels.triton_kv import store_kv


class TritonBackend:
    """Stateless; safe to share between layers, models and threads."""

    kind = BackendKind.TRITON

    def __init__(self) -> None:
        self._reference = TorchReferenceBackend()

    def store_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """key/value [num_tokens, kv_heads, head_dim] -> their slots, one kernel launch for both."""
        store_kv(kv_cache, key, value, meta.slot_mapping, meta.block_size)

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """query [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]."""
        if meta.is_decode_only:
            return paged_decode_attention(
                query, kv_cache, meta.block_tables, meta.seq_lens, scale, max(meta.seq_lens_cpu, default=0)
            )
        return self._reference.attend(query, kv_cache, meta, scale)
