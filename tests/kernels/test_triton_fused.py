"""The fused per-layer kernels against the eager torch formulas they replace (Hugging Face Llama).

Interpreter on the CPU, compiled on a GPU. Exact where the kernel rounds as torch does: rotary in
every dtype, the residual sum, and SiLU on a GPU (libdevice expf, as torch's CUDA SiLU). Within a
few ulps where it cannot be: the RMS mean's summation order differs, and the interpreter's exp
(numpy) is not torch's CPU exp (Sleef), so SiLU may differ in the last bits there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from paged_steps import DEVICE  # noqa: E402
from tandem.kernels import triton_fused  # noqa: E402
from tandem.kernels.triton_fused import add_rms_norm, available, rotary_qk_, silu_mul  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """|actual - expected| <= ulps units in the last place of expected (at least the smallest normal's)."""
    eps = torch.finfo(expected.dtype).eps
    tiny = torch.finfo(expected.dtype).tiny
    scale = expected.float().abs().clamp_min(tiny)
    ulp = torch.exp2(torch.floor(torch.log2(scale))) * eps
    err = (actual.float() - expected.float()).abs()
    assert bool((err <= ulps * ulp).all()), f"max error {(err / ulp).max().item()} ulps"


def _ref_add_rms_norm(x, residual, weight, eps):
    s = x if residual is None else x + residual
    v = s.float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 96, 100])
@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(dtype: torch.dtype, hidden: int, num_tokens: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(hidden + num_tokens)
    # x and residual as column slices of wider tensors: row stride != hidden.
    x = _randn(num_tokens, hidden + 8, dtype=dtype, gen=gen)[:, 3 : 3 + hidden]
    residual = _randn(num_tokens, 2 * hidden, dtype=dtype, gen=gen, scale=4.0)[:, hidden:] if with_residual else None
    weight = _randn(hidden, dtype=dtype, gen=gen, scale=0.5) + 1
    inputs = [t.clone() for t in (x, residual, weight) if t is not None]
    normed, s = add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_s = _ref_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(s, expected_s) and s.is_contiguous() and normed.is_contiguous()
    assert s.data_ptr() != x.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(inputs, [t for t in (x, residual, weight) if t is not None]))
    assert normed.dtype == dtype and normed.shape == (num_tokens, hidden)
    # The mean's sum runs in another order: fp32 to a few ulps; 16-bit one rounding of
    # s * rsqrt(...) may flip, which the weight multiply carries into at most 2 ulps.
    _assert_within_ulps(normed, expected_normed, 4 if dtype == torch.float32 else 2)


def test_add_rms_norm_wide_row() -> None:
    gen = torch.Generator().manual_seed(3)
    x, residual = _randn(2, 4096, dtype=torch.bfloat16, gen=gen), _randn(2, 4096, dtype=torch.bfloat16, gen=gen)
    weight = _randn(4096, dtype=torch.bfloat16, gen=gen)
    normed, s = add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_s = _ref_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(s, expected_s)
    _assert_within_ulps(normed, expected_normed, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(num_tokens: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_head_max", [4096, 0])
@pytest.mark.parametrize("num_tokens,q_heads,k_heads,head_dim", [(1, 4, 2, 64), (7, 4, 2, 96), (7, 5, 3, 128)])
def test_rotary_qk_on_fused_qkv(
    dtype: torch.dtype, one_head_max: int, num_tokens: int, q_heads: int, k_heads: int, head_dim: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """q and k are views into one fused qkv row; v and every other byte stay as they were. With
    one_head_max 0 programs take four heads (as past 4096 (token, head) pairs), some blocks partial."""
    monkeypatch.setattr(triton_fused, "ROTARY_ONE_HEAD_MAX", one_head_max)
    gen = torch.Generator().manual_seed(num_tokens + head_dim)
    qkv = _randn(num_tokens, (q_heads + 2 * k_heads) * head_dim, dtype=dtype, gen=gen, scale=3.0)
    before = qkv.clone()
    q = qkv[:, : q_heads * head_dim].view(num_tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + k_heads) * head_dim].view(num_tokens, k_heads, head_dim)
    cos, sin = _cos_sin(num_tokens, head_dim, dtype, gen)
    expected_q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    expected_k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    rotary_qk_(q, k, cos, sin)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, (q_heads + k_heads) * head_dim :], before[:, (q_heads + k_heads) * head_dim :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 96), (7, 100), (7, 1500)])
def test_silu_mul(dtype: torch.dtype, num_tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    wide = _randn(num_tokens, 2 * inter + 5, dtype=dtype, gen=gen, scale=3.0)
    gate_up = wide[:, 5:]  # strided rows
    out = silu_mul(gate_up)
    expected = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert out.shape == (num_tokens, inter) and out.dtype == dtype and out.is_contiguous()
    if DEVICE == "cuda":  # libdevice expf, as torch's CUDA SiLU
        assert torch.equal(out, expected)
    else:  # the interpreter's exp is numpy's, not torch's (Sleef)
        _assert_within_ulps(out, expected, 4 if dtype == torch.float32 else 2)
        if dtype != torch.float32:  # fp32: a quarter differ in the last bit
            assert (out != expected).float().mean().item() < 0.002


def test_empty_and_available() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    normed, s = add_rms_norm(x, None, torch.ones(64, device=DEVICE), 1e-5)
    assert normed.shape == s.shape == (0, 64)
    assert silu_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
    assert available(torch.device(DEVICE))


def test_rejects_mismatched_inputs() -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError):
        add_rms_norm(x, None, torch.ones(8, device=DEVICE, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError):
        add_rms_norm(x, torch.zeros(2, 4, device=DEVICE), torch.ones(8, device=DEVICE), 1e-5)
    q = torch.zeros(2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError):
        rotary_qk_(q, q, torch.zeros(2, 6, device=DEVICE), torch.zeros(2, 6, device=DEVICE))
    with pytest.raises(ValueError):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
