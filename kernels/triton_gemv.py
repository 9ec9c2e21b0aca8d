"""A Triton matrix-vector product for decode steps of one sequence: y = x @ weight.T + bias with x
a single row.

At one row a linear layer is a pure weight stream, and its speed is the share of the GPU that
streams. cuBLAS picks, for some shapes, a kernel of too few thread blocks to keep every SM reading
(Llama-8B's o_proj, 4096 x 4096, on an H100: 64 blocks, 55-67% of the read bandwidth), and splits
K with a second reduction kernel for others. Here every program owns BLOCK_N output features and
reads their whole rows, so a 4096-feature layer is 512 programs; each keeps BLOCK_N x BLOCK_K fp32
partial products and reduces them once, after the loop, so the loop is loads and FMAs only.
Measured on an H100 (scripts/gpu_decode_profile.py, each of 32 layers' own weight in turn): o_proj
13.5 us against cuBLAS's 16.7, gate_up 77 against 82, down 41 against 45, the 128k-row LM head 337
against 380. At 4 and 8 rows the 3-D accumulator of the same scheme ran out of registers and lost
to cuBLAS, so one row is all this takes.

Accumulation is fp32, bias added before the one rounding, as cuBLAS does; the summation order
differs from cuBLAS's. 16-bit weights only: float32 models keep torch's matmul (the parity mode).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K, NUM_WARPS = 8, 1024, 4  # best of a sweep on an H100 at Llama-8B shapes


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, N, stride_wn,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """K is a compile-time constant (a model has a handful): the interpreter cannot take a runtime
    range bound, and the compiler unrolls the loop."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.arange(0, 1)  # x as a [1, BLOCK_K] tile: with a 1-D x, a step's GEMVs took 6.8 ms, not 5.1 (H100)
    n_mask = n < N
    acc = tl.zeros([1, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + row[:, None] + k[None, :], mask=k_mask[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [1, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + n[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptr + row[:, None] + n[None, :], y.to(y_ptr.dtype.element_ty), mask=n_mask[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv takes this product: one contiguous row, a 16-bit weight on a CUDA device."""
    return (
        x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16) and x.dtype == weight.dtype
        and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1 and weight.stride(1) == 1
    )


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    tile: tuple[int, int, int] = (BLOCK_N, BLOCK_K, NUM_WARPS),
) -> torch.Tensor:
    """x [1, K], weight [N, K], bias [N] or None -> [1, N], as torch.nn.functional.linear.
    ``tile`` (BLOCK_N, BLOCK_K, warps) is for sweeps."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} is not one row that fits weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    n = weight.shape[0]
    block_n, block_k, warps = tile
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y if bias is None else bias, y, n, weight.stride(0),
        K=x.shape[1], HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return y
