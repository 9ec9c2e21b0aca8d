"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""
from __future__ import annotations

import torch
from torch import nn

from tandem.models.layers.fused import silu_mul
from tandem.models.layers.linear import MergedColumnParallelLinear, RowParallelLinear, TensorParallel


class SwiGLUMLP(nn.Module):
    """x [T, hidden] -> [T, hidden]; the intermediate activations are sharded across ranks."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))  # [T, 2 * intermediate / tp] -> [T, hidden]
