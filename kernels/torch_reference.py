"""The torch reference attention backend: paged KV store and attention in plain torch, CPU or GPU.

It is the correctness baseline every other backend is tested against, and the CPU serving path.
Decode-only steps run as one batched call per layer: each sequence's context is gathered through
its block table into a padded [num_seqs, max_ctx, kv_heads, head_dim] tensor and attended with one
masked scaled_dot_product_attention. Steps that contain a prefill (or chunked prefill) loop over
sequences, each query row masked causally at its absolute position in the sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels.interface import AttentionMetadata, BackendKind


def _gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, block_size: int, max_len: int
) -> torch.Tensor:
    """Keys or values of one or more sequences, in token order, padded to whole blocks.

    cache [num_blocks, block_size, kv_heads, head_dim] (strided view), block_table [..., blocks]
    -> [..., ceil(max_len / block_size) * block_size, kv_heads, head_dim].
    """
    num_blocks = -(-max_len // block_size)
    gathered = cache[block_table[..., :num_blocks]]  # [..., n, block_size, kv_heads, head_dim]
    return gathered.flatten(-4, -3)


class TorchReferenceBackend:
    """Stateless; safe to share between layers, models and threads."""

    kind = BackendKind.TORCH_REFERENCE

    def store_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """key/value [num_tokens, kv_heads, head_dim] -> their slots of the per-layer cache view,
        keys and values in one indexed write."""
        index = meta.derived.get("torch_store")
        if index is None:  # (block, key or value, offset) of every row of cat(key, value)
            blocks = meta.slot_mapping // meta.block_size
            offsets = meta.slot_mapping % meta.block_size
            kinds = torch.arange(2, device=blocks.device).repeat_interleave(blocks.numel())
            index = meta.derived["torch_store"] = (blocks.repeat(2), kinds, offsets.repeat(2))
        kv_cache.index_put_(index, torch.cat((key, value)).to(kv_cache.dtype))

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """query [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]."""
        if meta.is_decode_only:
            return self._attend_decode(query, kv_cache, meta, scale)
        return self._attend_per_sequence(query, kv_cache, meta, scale)

    def _attend_decode(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """One query per sequence, one query row per head; enable_gqa shares each key/value head
        with its group without a repeat. (Folding a group's heads into query rows of one kv head
        gave the same numbers and cost 20% more on the CPU: fewer, larger tasks for its threads.)"""
        num_seqs, num_heads, head_dim = query.shape
        table, mask = meta.derived.get("torch_decode") or _decode_gather(meta, query.device, query.dtype)
        num_kv_heads = kv_cache.shape[3]
        context_len = mask.shape[-1]

        def gather(kind: int) -> torch.Tensor:  # [S, kv_heads, L, head_dim]
            # One index_select over whole blocks ([block_size, kv_heads, head_dim] rows, contiguous)
            # gathers every sequence's keys (or values) in token order: a row copy, no element gather.
            rows = kv_cache[:, kind].index_select(0, table)  # [S * n, block_size, kv_heads, head_dim]
            return rows.view(num_seqs, context_len, num_kv_heads, head_dim).transpose(1, 2).to(query.dtype)

        # Padding slots hold stale keys/values of earlier sequences: finite, because the cache is
        # zero-filled at start and only finite values are ever stored, so the mask gives them
        # exactly zero weight. (Zeroing them here cost 40% of decode attention on the CPU.)
        keys, values = gather(0), gather(1)
        q = query.reshape(num_seqs, num_heads, 1, head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.reshape(num_seqs, num_heads, head_dim)

    def _attend_per_sequence(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Any mix of prefill, chunked prefill and decode: one attention call per sequence."""
        out = torch.empty_like(query)
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if query_len == 0:
                continue
            end = start + query_len
            block_table = meta.block_tables[i]
            keys = _gather_context(kv_cache[:, 0], block_table, meta.block_size, seq_len)[:seq_len]
            values = _gather_context(kv_cache[:, 1], block_table, meta.block_size, seq_len)[:seq_len]
            out[start:end] = _causal_attention(query[start:end], keys, values, scale)
            start = end
        return out


def _decode_gather(
    meta: AttentionMetadata, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step's block ids to gather, [S * n] int64; the mask of real context slots,
    [S, 1, 1, n * block_size] in the queries' dtype), shared by the step's layers."""
    num_blocks_per_seq = -(-max(meta.seq_lens_cpu) // meta.block_size)
    table = meta.block_tables[:, :num_blocks_per_seq].reshape(-1).to(torch.long)
    key_pos = torch.arange(num_blocks_per_seq * meta.block_size, device=device)
    visible = key_pos.unsqueeze(0) < meta.seq_lens.to(device).unsqueeze(1)  # [S, L]
    # Additive, as scaled_dot_product_attention turns a boolean mask into on every call, and in
    # the queries' dtype: on CUDA a float32 mask beside bfloat16 queries gives wrong attention.
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    meta.derived["torch_decode"] = (table, mask[:, None, None, :])
    return meta.derived["torch_decode"]


def _causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """query [q, heads, d] are the last q positions of a context keys/values [L, kv_heads, d].

    Query j sits at position L - q + j and sees keys 0..L - q + j. Returns [q, heads, d].
    """
    query_len, seq_len = query.shape[0], keys.shape[0]
    q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
    k_pos = torch.arange(seq_len, device=query.device)
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [q, L]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),  # [heads, q, d]
        keys.transpose(0, 1).to(query.dtype),  # [kv_heads, L, d]
        values.transpose(0, 1).to(query.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
