"""The small per-layer ops of a CPU decode step in one C call each (kernels/cpu_fused.c): residual
add + RMSNorm, rotary embedding of q and k, SiLU-and-multiply. The CPU counterpart of
kernels/triton_fused.py, with its function names and signatures, for float32 tensors.

Built without fused multiply-adds, so each op rounds where the torch formula does: rotary is bit
for bit torch's; RMSNorm differs only by the order of its mean's sum, SiLU by the exp (within 2
ulp of expf, vectorized, cpu_vector.h).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from tandem.kernels.native_build import load_native

SOURCE = Path(__file__).with_name("cpu_fused.c")
_INT, _LONG, _POINTER, _FLOAT = ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "add_rms_norm": (None, [_POINTER, _POINTER, _POINTER, _INT, _INT, _FLOAT, _POINTER, _POINTER]),
    "silu_mul": (None, [_POINTER, _INT, _INT, _POINTER]),
    "rotary": (None, [_POINTER, _INT, _LONG, _INT, _INT, _POINTER, _POINTER]),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None where they cannot be built (the reason is logged once)."""
    return load_native(SOURCE, _SIGNATURES, extra_flags=("-ffp-contract=off",))


def available(x: torch.Tensor) -> bool:
    """Whether these kernels take x: float32 on the CPU, where the library built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and library() is not None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, hidden] -> (weight * (s * rsqrt(mean(s^2) + eps)), s) with s = x + residual,
    or x itself (not copied) when residual is None. The inputs are not modified."""
    x = _rows(x, "x")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    residual = None if residual is None else _rows(residual, "residual")
    weight = weight.contiguous()
    normed = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    _library().add_rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
        x.shape[0], x.shape[1], eps, normed.data_ptr(), summed.data_ptr(),
    )
    return normed, summed


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: x = x * cos + rotate_half(x) * sin for q [T, Hq, D] and k [T, Hk, D], views whose
    heads are contiguous within a token (as in one fused qkv tensor); cos, sin [T, D]."""
    cos, sin = cos.contiguous(), sin.contiguous()
    for x in (q, k):
        tokens, heads, head_dim = x.shape
        if x.dtype != torch.float32 or x.stride(2) != 1 or x.stride(1) != head_dim or head_dim % 2:
            raise ValueError(f"rotary needs float32 [T, H, D] with contiguous heads: {tuple(x.shape)} {x.stride()}")
        if cos.shape != (tokens, head_dim) or sin.shape != cos.shape or cos.dtype != torch.float32:
            raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} must be float32 [{tokens}, {head_dim}]")
        _library().rotary(x.data_ptr(), tokens, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first) -> silu(gate) * up, [T, I]."""
    gate_up = _rows(gate_up, "gate_up")
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up width {gate_up.shape[1]} is odd")
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _library().silu_mul(gate_up.data_ptr(), gate_up.shape[0], out.shape[1], out.data_ptr())
    return out


def _library() -> ctypes.CDLL:
    loaded = library()
    assert loaded is not None, "callers check available() first"
    return loaded


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2 or t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be float32 [T, n] on the CPU: {tuple(t.shape)} {t.dtype} {t.device}")
    return t.contiguous()
