"""Turns a StepPlan into the model's input tensors, runs one forward pass, returns logits.

Inputs are flattened (no padding between sequences): the tokens each chunk computes, their
positions, the cache slot each new token's key/value goes to, and per-sequence block tables.
Only the last token of a chunk that completes its sequence produces logits, so prefill chunks
that stop mid-prompt cost no lm_head work.

A step is built in two halves: ``build_batch`` flattens the chunks into host integers (a
``StepBatch``), ``ModelRunner.run`` turns those into tensors and runs the model. Tensor-parallel
followers have no scheduler or sequences: rank 0 sends them its StepBatch and they call ``run``.

With the overlapped step (workers/overlapped_step.py) some input ids are not on the host yet: the
token a sequence sampled in the step still in flight. Its StepBatch row holds 0, and
``DeviceInputs`` fills it from that step's sampled-token tensor on the device before the forward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.kernels.interface import AttentionBackend, AttentionMetadata, ForwardContext
from tandem.workers.scheduler import ScheduledChunk
from tandem.workers.sequence import PLACEHOLDER_TOKEN_ID

if TYPE_CHECKING:
    from tandem.workers.cuda_graphs import DecodeGraphs


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step's model inputs as host integers, flattened over the step's chunks."""

    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T] flat cache slot (block_id * block_size + offset) of each new token
    query_lens: tuple[int, ...]  # [S] tokens computed per sequence
    seq_lens: tuple[int, ...]  # [S] context length after this step (cached + new)
    block_table: list[list[int]]  # [S, max_blocks] padded with 0
    logit_rows: tuple[int, ...]  # token index of the last token of every chunk that completes its sequence


@dataclass(frozen=True, slots=True)
class DeviceInputs:
    """Input ids of a step that are still on the device: tokens the step in flight sampled, which
    this step reads without waiting for them to reach the host (workers/overlapped_step.py)."""

    sampled: torch.Tensor  # [m] int64 on the device: the step in flight's tokens, one per sampled row
    rows: tuple[int, ...]  # token index in this step's flattened batch
    sources: tuple[int, ...]  # the row of ``sampled`` that each of ``rows`` takes

    def scatter_into(self, input_ids: torch.Tensor) -> None:
        """Write the in-flight tokens into ``input_ids`` [>= T], on the device's stream."""
        n = len(self.rows)
        if self.rows == self.sources == tuple(range(n)):  # a steady decode: same rows, same order
            input_ids[:n].copy_(self.sampled[:n])
            return
        device = input_ids.device
        rows, sources = to_device(list(self.rows), device, torch.long), to_device(list(self.sources), device, torch.long)
        input_ids.index_copy_(0, rows, self.sampled.index_select(0, sources))


def build_batch(chunks: Sequence[ScheduledChunk], block_size: int) -> StepBatch:
    """Flatten a step's chunks, in plan order, into the inputs of one forward pass."""
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    logit_rows: list[int] = []
    for chunk in chunks:
        seq = chunk.seq
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens
        token_ids.extend(seq.token_ids[start:end])
        if token_ids[-1] == PLACEHOLDER_TOKEN_ID:  # only ever a sequence's last token
            token_ids[-1] = 0  # a valid id: DeviceInputs overwrites it on the device
        positions.extend(range(start, end))
        blocks = seq.block_ids
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_lens.append(chunk.num_tokens)
        seq_lens.append(end)
        if chunk.completes_sequence:
            logit_rows.append(len(token_ids) - 1)
    max_blocks = max(len(c.seq.block_ids) for c in chunks)
    table = [c.seq.block_ids + [0] * (max_blocks - len(c.seq.block_ids)) for c in chunks]
    return StepBatch(token_ids, positions, slots, tuple(query_lens), tuple(seq_lens), table, tuple(logit_rows))


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
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA (workers/cuda_graphs.py)

    def execute(self, chunks: Sequence[ScheduledChunk], device_inputs: DeviceInputs | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_chunks, vocab], one row per chunk
        whose completes_sequence is true, in plan order."""
        return self.run(build_batch(chunks, self.block_size), device_inputs)

    @torch.inference_mode()
    def run(self, batch: StepBatch, device_inputs: DeviceInputs | None = None) -> torch.Tensor:
        """Run one step from its flattened inputs; returns logits [len(batch.logit_rows), vocab]."""
        if self.graphs is not None and self.graphs.can_run(batch.query_lens, len(batch.block_table[0])):
            logits = self.graphs.run(
                batch.token_ids, batch.positions, batch.slot_mapping, batch.seq_lens, batch.block_table, device_inputs
            )
            if len(batch.logit_rows) == len(batch.query_lens):  # a decode: every row samples
                return logits
            return logits.index_select(0, self._tensor(list(batch.logit_rows), torch.long))
        meta = AttentionMetadata(
            query_start_loc=self._tensor([0, *_cumsum(batch.query_lens)], torch.int32),
            seq_lens=self._tensor(list(batch.seq_lens), torch.int32),
            block_tables=self._tensor(batch.block_table, torch.int32),
            slot_mapping=self._tensor(batch.slot_mapping, torch.int64),
            query_lens_cpu=batch.query_lens,
            seq_lens_cpu=batch.seq_lens,
            block_size=self.block_size,
        )
        ctx = ForwardContext(self.backend, meta, self.kv_caches)
        input_ids = self._tensor(batch.token_ids, torch.int64)
        if device_inputs is not None:
            device_inputs.scatter_into(input_ids)
        hidden = self.model(input_ids, self._tensor(batch.positions, torch.int64), ctx)  # [num_tokens, hidden_size]
        if not batch.logit_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        index = self._tensor(list(batch.logit_rows), torch.long)
        return self.model.compute_logits(hidden.index_select(0, index))

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, self.device, dtype)


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list as a tensor on ``device`` (dtype None: as torch.tensor infers it), in one small
    copy. On CUDA the copy goes through pinned memory and is queued without blocking: from pageable
    memory (torch.tensor(..., device=cuda) included) it would wait for everything already queued on
    the stream, the overlapped step's forward too."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype).to(device)
    return pinned(values, dtype).to(device, non_blocking=True)


def pinned(values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list in pinned memory, so that a copy from it to a CUDA device is asynchronous."""
    return torch.tensor(values, dtype=dtype).pin_memory()


def _cumsum(values: Sequence[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out
