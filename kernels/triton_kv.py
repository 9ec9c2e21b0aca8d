"""Triton kernels that move KV-cache bytes: the per-step store and the block gather/scatter.

Both honour every stride of the per-layer cache view, because that view is a slice of the
block-major cache of all layers (see tandem.kvtransfer.kv_cache): its block stride is
num_layers times its own block size. Offsets are computed in int64, since a cache of tens of
GB has more elements than int32 counts.

Importing this module imports triton; callers that must work without it import it lazily.
Set TRITON_INTERPRET=1 before the import to run the kernels on CPU tensors (tests do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr, block_size,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P: tl.constexpr, DIM_P: tl.constexpr,
):
    """One program per token: its [kv_heads, head_dim] key and value into the token's slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_P)[:, None]
    dims = tl.arange(0, DIM_P)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & (slot >= 0)  # a negative slot is padding
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    dst = cache_ptr + block * stride_cb + offset * stride_ct + heads * stride_ch + dims * stride_cd
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, block_size: int
) -> None:
    """key/value [num_tokens, kv_heads, head_dim] -> kv_cache[slot // bs, 0/1, slot % bs] (strided view
    [num_blocks, 2, block_size, kv_heads, head_dim]); one launch. Negative slots are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if kv_cache.shape[1:] != (2, block_size, num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"cache {tuple(kv_cache.shape)} does not hold keys {tuple(key.shape)}, values {tuple(value.shape)}")
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping, block_size,
        *key.stride(), *value.stride(), *kv_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_P=triton.next_power_of_2(num_kv_heads), DIM_P=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _copy_rows_kernel(
    dst_ptr, src_ptr, index_ptr, row_len, stride_dst, stride_src,
    SCATTER: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (i, chunk) copies BLOCK elements of one row: gather dst[i] = src[index[i]], scatter
    dst[index[i]] = src[i]."""
    i = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    row = tl.load(index_ptr + i).to(tl.int64)
    if SCATTER:
        dst_row = row
        src_row = i
    else:
        dst_row = i
        src_row = row
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    values = tl.load(src_ptr + src_row * stride_src + cols, mask=mask)
    tl.store(dst_ptr + dst_row * stride_dst + cols, values, mask=mask)


COPY_BLOCK = 4096  # elements per program: 32 KiB of int64 words, enough in flight per SM


def gather_rows(slots: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    """slots[i] = rows[index[i]] for 2-D slots/rows of one dtype (bytes or words); one launch."""
    _copy_rows(slots, rows, index, scatter=False)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, slots: torch.Tensor) -> None:
    """rows[index[i]] = slots[i]; the inverse of gather_rows."""
    _copy_rows(rows, slots, index, scatter=True)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, scatter: bool) -> None:
    if dst.dim() != 2 or src.dim() != 2 or dst.dtype != src.dtype or dst.shape[1] != src.shape[1]:
        raise ValueError(f"need 2-D rows of one dtype and width, got {tuple(dst.shape)} {dst.dtype}, "
                         f"{tuple(src.shape)} {src.dtype}")
    if dst.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError("rows must be contiguous within a row")
    num_rows = index.numel()
    if num_rows > (src.shape[0] if scatter else dst.shape[0]):
        raise ValueError(f"{num_rows} indices for {dst.shape[0]} slots")
    if num_rows == 0:
        return
    row_len = dst.shape[1]
    grid = (num_rows, triton.cdiv(row_len, COPY_BLOCK))
    _copy_rows_kernel[grid](
        dst, src, index, row_len, dst.stride(0), src.stride(0), SCATTER=scatter, BLOCK=COPY_BLOCK, num_warps=8
    )
