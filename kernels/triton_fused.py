"""Fused Triton kernels for the small per-layer ops of a decode step: residual add + RMSNorm,
rotary embedding of q and k, and SiLU-and-multiply. One launch each, for any number of tokens.

Each kernel reproduces the rounding of the eager torch formula it replaces (Hugging Face Llama):
every torch op on 16-bit tensors computes in fp32 and rounds to the tensor dtype, so the kernels
compute in fp32 and round at the same points. Rotary is then bit-exact in every dtype, and so is
SiLU against torch on CUDA; RMSNorm differs only through the order of the mean's sum (an ulp, rarely).

Triton's interpreter (TRITON_INTERPRET=1, for tests on CPU) truncates fp32 -> bfloat16 casts instead
of rounding to nearest even, and has no libdevice; under it the kernels round bfloat16 by integer
arithmetic (_round) and take numpy's exp. Compiled kernels use the hardware cast and libdevice's
expf, the function torch's CUDA SiLU calls.

Importing this module imports triton; callers that must work without it import it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _round(x, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """fp32 x -> dtype, round to nearest even. BF16_BY_BITS: by integer ops (the interpreter; no NaNs)."""
    if BF16_BY_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, normed_ptr, sum_ptr, hidden, eps, stride_x, stride_r,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """One program per row: s = round(x + residual); normed = round(w * round(s * rsqrt(mean(s^2) + eps)))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = sum_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = _round(s.to(tl.float32) + r.to(tl.float32), dtype, BF16_BY_BITS)
    tl.store(sum_ptr + row * hidden + cols, s, mask=mask)
    v = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(v * v, axis=0) / hidden + eps)
    n = _round(v * inv_rms, dtype, BF16_BY_BITS).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * hidden + cols, _round(w * n, dtype, BF16_BY_BITS), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, hidden] (rows may be strided), weight [hidden], one dtype -> (normed, s), both new
    contiguous [T, hidden]: s = x + residual (x itself, copied, when residual is None) and
    normed = weight * (s.float() * rsqrt(mean(s.float()^2) + eps)).to(dtype), as Hugging Face's
    LlamaRMSNorm after the residual add. The inputs are not modified."""
    _check_rows(x, "x")
    hidden = x.shape[1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not fit x {tuple(x.shape)} {x.dtype}")
    if residual is not None:
        _check_rows(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} differs from x {tuple(x.shape)} {x.dtype}")
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(normed)
    if x.shape[0] == 0:
        return normed, s
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, x if residual is None else residual, weight, normed, s, hidden, eps,
        x.stride(0), x.stride(0) if residual is None else residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, BF16_BY_BITS=_bf16_by_bits(x.dtype),
        num_warps=min(16, max(1, block // 512)),
    )
    return normed, s


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_BLOCKS: tl.constexpr, HEADS: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """Program (t, b) rotates HEADS heads of token t: blocks b < Q_BLOCKS of q, the rest of k."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    num_heads = tl.where(b < Q_BLOCKS, NUM_Q_HEADS, NUM_K_HEADS)
    if b < Q_BLOCKS:
        base = q_ptr + t * stride_qt
        stride_h = stride_qh
        first = b * HEADS
    else:
        base = k_ptr + t * stride_kt
        stride_h = stride_kh
        first = (b - Q_BLOCKS) * HEADS
    heads = first + tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF_P)[None, :]
    d_mask = d < HALF
    mask = (heads < num_heads) & d_mask
    x_off = heads.to(tl.int64) * stride_h + d
    x1 = tl.load(base + x_off, mask=mask, other=0.0).to(tl.float32)  # [HEADS, HALF_P]
    x2 = tl.load(base + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)  # [1, HALF_P]
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * stride_st + d, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * stride_st + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    # torch: x * cos + cat(-x2, x1) * sin, each op rounded to dtype (compiled without fp fusion).
    a1 = _round(x1 * cos1, dtype, BF16_BY_BITS).to(tl.float32)
    b1 = _round(-x2 * sin1, dtype, BF16_BY_BITS).to(tl.float32)
    a2 = _round(x2 * cos2, dtype, BF16_BY_BITS).to(tl.float32)
    b2 = _round(x1 * sin2, dtype, BF16_BY_BITS).to(tl.float32)
    tl.store(base + x_off, _round(a1 + b1, dtype, BF16_BY_BITS), mask=mask)
    tl.store(base + x_off + HALF, _round(a2 + b2, dtype, BF16_BY_BITS), mask=mask)


ROTARY_ONE_HEAD_MAX = 4096  # (token, head) pairs up to which a program takes one head (decode), else 4


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place, Neox/HF style: x = x * cos + rotate_half(x) * sin for q [T, Hq, D] and k [T, Hk, D]
    (views, e.g. of one fused qkv tensor; last stride 1), cos/sin [T, D] in q's dtype (cat(freqs, freqs)).
    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]). One launch for q and k."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    dtype = q.dtype
    if dtype not in _DTYPES or k.dtype != dtype or cos.dtype != dtype or sin.dtype != dtype:
        raise ValueError(f"q, k, cos, sin must share one of {_DTYPES}: {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}")
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need one token count and an even head dim")
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} must be [{num_tokens}, {head_dim}]")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("q, k, cos, sin must be contiguous in their last dim")
    if num_tokens == 0:
        return
    heads = 1 if num_tokens * (num_q_heads + num_k_heads) <= ROTARY_ONE_HEAD_MAX else 4
    q_blocks = triton.cdiv(num_q_heads, heads)
    half = head_dim // 2
    _rotary_kernel[(num_tokens, q_blocks + triton.cdiv(num_k_heads, heads))](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, Q_BLOCKS=q_blocks, HEADS=heads,
        HALF=half, HALF_P=triton.next_power_of_2(half), BF16_BY_BITS=_bf16_by_bits(dtype),
        num_warps=1 if heads == 1 else 4, **_NO_FP_FUSION,
    )


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, out_ptr, inter, stride_in, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Program (t, c): out[t, c-th BLOCK] = round(round(silu(gate)) * up)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + t * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + t * stride_in + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if INTERPRETED:  # no libdevice there
        e = tl.exp(-gate)
    else:
        e = libdevice.exp(-gate)
    dtype = out_ptr.dtype.element_ty
    silu = _round(tl.math.div_rn(gate, 1.0 + e), dtype, BF16_BY_BITS).to(tl.float32)
    tl.store(out_ptr + t * inter + cols, _round(silu * up, dtype, BF16_BY_BITS), mask=mask)


SILU_BLOCK = 1024  # elements per program


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, up second; rows may be strided) -> new contiguous silu(gate) * up
    [T, I], rounded as torch's F.silu(gate) * up."""
    _check_rows(gate_up, "gate_up")
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up width {width} is odd")
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    _silu_mul_kernel[(num_tokens, triton.cdiv(inter, SILU_BLOCK))](
        gate_up, out, inter, gate_up.stride(0), BLOCK=SILU_BLOCK,
        BF16_BY_BITS=_bf16_by_bits(gate_up.dtype), INTERPRETED=_interpreted(), num_warps=4,
    )
    return out


def available(device: torch.device) -> bool:
    """Whether these kernels run on tensors of device: a CUDA (or ROCm) device, or any under the interpreter."""
    return device.type == "cuda" or _interpreted()


def _interpreted() -> bool:
    """TRITON_INTERPRET was set when this module was imported (the decorators read it then)."""
    return not isinstance(_silu_mul_kernel, triton.runtime.JITFunction)


def _bf16_by_bits(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreted()


_NO_FP_FUSION = {} if _interpreted() else {"enable_fp_fusion": False}  # no a * b + c -> fma


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or t.dtype not in _DTYPES or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be [T, n] of {_DTYPES}, contiguous within rows: {tuple(t.shape)} {t.dtype}")
