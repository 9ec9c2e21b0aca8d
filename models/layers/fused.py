"""The small per-layer ops of a decoder step (residual add + RMSNorm, rotary on q and k, SiLU-mul),
each either one fused kernel or the plain torch formula.

A decode step is bound by the count of these ops, not by their bytes: on a GPU replaying a CUDA
graph they are about 30 of a Llama layer's 40 kernels, at 2-3 us each; on a CPU each torch op
pays its dispatch. The fused kernels run for 16-bit activations on CUDA (kernels/triton_fused.py)
and for float32 on the CPU (kernels/cpu_fused.py, where its C library builds); float32 on CUDA
keeps the torch formulas, which match transformers bit for bit.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tandem.kernels import cpu_fused
from tandem.models.layers.norm import RMSNorm
from tandem.models.layers.rotary import RotaryTables, rotate

_FUSED_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _kernels():
    """kernels/triton_fused.py, or None where Triton does not import."""
    try:
        from tandem.kernels import triton_fused
    except ImportError:
        return None
    return triton_fused


def _fused(x: torch.Tensor):
    if cpu_fused.available(x):
        return cpu_fused
    kernels = _kernels()
    if kernels is not None and x.dtype in _FUSED_DTYPES and x.is_cuda and kernels.available(x.device):
        return kernels
    return None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); the first layer has no residual yet: (norm(x), x)."""
    if (kernels := _fused(x)) is not None:
        return kernels.add_rms_norm(x, residual, norm.weight, norm.eps)
    summed = x if residual is None else x + residual
    return norm(summed), summed


def rotary_qk(qk: torch.Tensor, num_q_heads: int, tables: RotaryTables) -> tuple[torch.Tensor, torch.Tensor]:
    """qk [T, heads + kv_heads, d] (q heads first; a view of the fused projection's output) ->
    (q, k) rotated. The fused kernel rotates in place; the torch path rotates q and k together,
    in one pass rather than two, since a decode step on a CPU pays per op, not per byte."""
    q, k = qk[:, :num_q_heads], qk[:, num_q_heads:]
    if (kernels := _fused(qk)) is not None:
        kernels.rotary_qk_(q, k, tables.cos, tables.sin)
        return q, k
    rotated = rotate(qk, *tables.broadcast())
    return rotated[:, :num_q_heads], rotated[:, num_q_heads:]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate, then up) -> silu(gate) * up, [T, I]."""
    if (kernels := _fused(gate_up)) is not None:
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
