"""RMSNorm with Hugging Face semantics: normalise in float32, cast back, then scale by the weight.

The order of the cast and the multiply matters for bit-for-bit parity with transformers in bf16.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x [..., dim] -> weight * (x / rms(x)), the statistic taken in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same formula without the two casts, which cost per call
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)
