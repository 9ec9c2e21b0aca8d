"""Triton paged decode attention: one query token per sequence over its block table.

Split-KV (flash-decoding): program (seq, kv_head, split) reads one contiguous range of the
sequence's context and keeps an online softmax (running max m, sum l, weighted values acc) in
fp32 for the group of query heads that share the kv head, so each key/value is read once for the
whole group (grouped-query attention costs no repeat). With one split the program writes the
output itself; with several, a second kernel merges the splits' (m, l, acc), one program per query head. Splits exist for
small batches: 8 kv heads of one sequence are 8 programs, far too few for 132 SMs.

16-bit caches use tl.dot (tensor cores, the query group padded to 16 rows): decode is bound by
memory, but the elementwise product-and-sum alternative spent its time in cross-thread reductions
and reached a fifth of the bandwidth (H200, Llama-8B shapes, batch 128 at 1k: 0.86 against
3.2-3.8 TB/s). fp32 caches keep the elementwise fp32 path, so fp32 stays IEEE (tl.dot would round
to tf32): it is the parity mode, not the fast one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (context tokens per loop iteration, warps) of the tl.dot and the fp32 path; need not divide the page
# size. Best of a sweep on an H200 (Llama-8B shapes, batch 1-128 at 1k context).
DOT_TILE = (32, 4)
FP32_TILE = (16, 2)
MIN_TOKENS_PER_SPLIT = 64  # a split shorter than this costs more in merging than it saves
MAX_SPLITS = 16


@triton.jit
def _attend_tile(
    q, m, l, acc, start, hi, seq, kv_head, d, d_mask, cache_ptr, block_tables_ptr, block_size,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd, stride_bt, scale,
    BLOCK: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Online-softmax update of (m, l, acc) with context tokens start .. start + BLOCK (those < hi)."""
    n = start + tl.arange(0, BLOCK)
    n_mask = n < hi
    page = tl.load(block_tables_ptr + seq * stride_bt + n // block_size, mask=n_mask, other=0).to(tl.int64)
    row = page * stride_cb + (n % block_size).to(tl.int64) * stride_ct + kv_head * stride_ch
    kv_off = row[:, None] + d[None, :] * stride_cd
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK, DIM_P]
    v = tl.load(cache_ptr + stride_ckv + kv_off, mask=kv_mask, other=0.0)
    if USE_DOT:  # q [GROUP_P >= 16, DIM_P] in the cache's 16-bit dtype; fp32 accumulation
        s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_P, BLOCK]
    else:
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # q is fp32 and pre-scaled
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l, acc


@triton.jit
def _decode_partial_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale, tokens_per_split, block_size,
    stride_qs, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd,
    stride_bt, stride_os, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, USE_DOT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, DIM_P)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q_off = seq * stride_qs + heads[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if USE_DOT:
        q = q.to(cache_ptr.dtype.element_ty)
    else:
        q = q.to(tl.float32) * scale

    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    # Every tile starts below hi, so holds >= 1 valid token: m is finite after the first.
    if INTERPRETED:  # Triton's interpreter turns a runtime range() bound into an int through a
        start = lo   # 1-element array, which numpy >= 2.4 refuses; a while condition it takes
        while start < hi:
            m, l, acc = _attend_tile(
                q, m, l, acc, start, hi, seq, kv_head, d, d_mask, cache_ptr, block_tables_ptr, block_size,
                stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd, stride_bt, scale, BLOCK, USE_DOT,
            )
            start += BLOCK
    else:  # a for loop, which the compiler software-pipelines (a while loop it does not)
        for start in range(lo, hi, BLOCK):
            m, l, acc = _attend_tile(
                q, m, l, acc, start, hi, seq, kv_head, d, d_mask, cache_ptr, block_tables_ptr, block_size,
                stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd, stride_bt, scale, BLOCK, USE_DOT,
            )

    if NUM_SPLITS == 1:
        out_off = seq * stride_os + heads[:, None] * stride_oh + d[None, :] * stride_od
        out = acc / l[:, None]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:  # partials of the group's real heads: acc [S, heads, splits, DIM_P], then m and l [S, heads, splits]
        num_heads = num_kv_heads * GROUP
        part = (seq * num_heads + heads) * NUM_SPLITS + split  # [GROUP_P]
        tl.store(part_acc_ptr + part[:, None] * DIM_P + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + part, m, mask=g_mask)
        tl.store(part_ml_ptr + tl.num_programs(0) * num_heads * NUM_SPLITS + part, l, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_os, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """One program per (sequence, query head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s;
    an empty split has m = -inf, weight 0. Per head, not per kv head: a program reads
    NUM_SPLITS x DIM_P floats, and the step has enough programs to read them in parallel."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    sp = tl.arange(0, SPLITS_P)
    d = tl.arange(0, DIM_P)
    sp_mask = sp < NUM_SPLITS
    part = (seq * num_heads + head) * NUM_SPLITS + sp  # [SPLITS_P]
    m = tl.load(part_ml_ptr + part, mask=sp_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + tl.num_programs(0) * num_heads * NUM_SPLITS + part, mask=sp_mask, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(part_acc_ptr + part[:, None] * DIM_P + d[None, :], mask=sp_mask[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM, none shorter than MIN_TOKENS_PER_SPLIT, at most
    MAX_SPLITS (H200, 8 kv heads, 1k context in a 2k graph bucket: 16 splits 22 us, 32 splits 65 us;
    the merge grows with the split count)."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = triton.cdiv(2 * num_sms, num_seqs * num_kv_heads)
    return max(1, min(wanted, max_seq_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    """query [S, heads, head_dim], one token per sequence, over kv_cache (strided view [num_blocks, 2,
    block_size, kv_heads, head_dim]) through block_tables [S, max_blocks] and seq_lens [S] (context
    length including the query's own token) -> [S, heads, head_dim] in query's dtype.

    max_seq_len is a host-side bound on seq_lens (it sizes the splits, so no device sync is needed).
    """
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(kv_cache.shape)}")
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    group = num_heads // num_kv_heads
    interpreted = not isinstance(_decode_partial_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET at import
    # Tensor cores for 16-bit caches; the interpreter's tl.dot misreads bfloat16, so it gets the fp32 path.
    use_dot = kv_cache.dtype == torch.float16 or (kv_cache.dtype == torch.bfloat16 and not interpreted)
    block_n, num_warps = DOT_TILE if use_dot else FP32_TILE
    group_p, dim_p = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    if use_dot:
        group_p = max(group_p, 16)  # tl.dot needs 16 rows
    tokens_per_split = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    if num_splits > 1:
        part_acc = torch.empty((num_seqs, num_heads, num_splits, dim_p), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((2, num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused by the kernel's one-split path
    sizes = dict(GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, DIM_P=dim_p, NUM_SPLITS=num_splits)
    _decode_partial_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, kv_cache, block_tables, seq_lens, out, part_acc, part_ml,
        scale, tokens_per_split, block_size,
        *query.stride(), *kv_cache.stride(), block_tables.stride(0), *out.stride(),
        BLOCK=block_n, INTERPRETED=interpreted, USE_DOT=use_dot, num_warps=num_warps, **sizes,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            out, part_acc, part_ml, *out.stride(),
            HEAD_DIM=head_dim, DIM_P=dim_p, NUM_SPLITS=num_splits, SPLITS_P=triton.next_power_of_2(num_splits),
        )
    return out
