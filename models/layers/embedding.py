"""Token embedding and the output head, both split by vocabulary rows across tensor-parallel ranks.

Rank r holds rows ``[r * per_rank, (r + 1) * per_rank)`` of the full [vocab, hidden] table, where
``per_rank = ceil(vocab / tp)``; the last rank's tail past ``vocab`` is zero padding. At size 1
both are a plain embedding / plain matmul. With tied word embeddings the head shares the
embedding's parameter, so the same shard layout serves both.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tandem.models.layers.linear import PrepackedWeight, TensorParallel, copy_weight


class VocabParallelEmbedding(nn.Module):
    """input ids [T] -> embeddings [T, hidden]; out-of-shard ids contribute zeros before the all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.num_rows = max(0, min(self.rows_per_rank, vocab_size - self.vocab_start))  # real rows here
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        if loaded_weight.shape[0] != self.vocab_size:
            raise ValueError(f"vocab size mismatch: model {self.vocab_size}, checkpoint {loaded_weight.shape[0]}")
        with torch.no_grad():
            param.data.zero_()
        rows = loaded_weight.narrow(0, self.vocab_start, self.num_rows)
        copy_weight(param.data.narrow(0, 0, self.num_rows), rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out)
        return out


class ParallelLMHead(PrepackedWeight, VocabParallelEmbedding):
    """hidden [N, hidden] -> logits [N, vocab] in float32, gathered over ranks."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden, None)  # [N, rows_per_rank]
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.vocab_size].float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)
