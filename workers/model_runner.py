"""Turns a StepPlan into the model's input tensors, runs one forward pass, returns logits.

Inputs are flattened (no padding between sequences): the tokens each chunk computes, their
positions, the cache slot each new token's key/value goes to, and per-sequence block tables.
Only the last token of a chunk that completes its sequence produces logits, so prefill chunks
that stop mid-prompt cost no lm_head work.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tandem.kernels.interface import AttentionBackend, AttentionMetadata, ForwardContext
from tandem.workers.scheduler import ScheduledChunk


class ModelRunner:
    """Owns the model and its KV cache on one device."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: tuple[torch.Tensor, ...],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_chunks, vocab], one row per chunk
        whose completes_sequence is true, in plan order."""
        input_ids, positions, meta = self._prepare(chunks)
        ctx = ForwardContext(self.backend, meta, self.kv_caches)
        hidden = self.model(input_ids, positions, ctx)  # [num_tokens, hidden_size]
        last_rows = [end - 1 for c, end in zip(chunks, _cumsum(meta.query_lens_cpu)) if c.completes_sequence]
        if not last_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        index = torch.tensor(last_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, index))

    def _prepare(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        block_size = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        for chunk in chunks:
            seq = chunk.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
            query_lens.append(chunk.num_tokens)
            seq_lens.append(end)
        max_blocks = max(len(c.seq.block_ids) for c in chunks)
        table = [c.seq.block_ids + [0] * (max_blocks - len(c.seq.block_ids)) for c in chunks]
        meta = AttentionMetadata(
            query_start_loc=self._tensor([0, *_cumsum(query_lens)], torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor(table, torch.int32),
            slot_mapping=self._tensor(slots, torch.int64),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            block_size=block_size,
        )
        return self._tensor(token_ids, torch.int64), self._tensor(positions, torch.int64), meta

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        # Built on the host, copied once: one small H2D transfer per tensor per step.
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)


def _cumsum(values: Sequence[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out
