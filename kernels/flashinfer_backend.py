"""The FlashInfer attention backend: paged decode and prefill kernels of flashinfer-python 0.7.

FlashInfer reads our per-layer cache view as its "NHD" paged layout, one tensor
[pages, 2, page_size, kv_heads, head_dim]; the view's page stride (all layers of a block lie
between two pages of one layer) is honoured by its kernels, so nothing is copied. A sequence's
pages are given in CSR form: ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]`` are its block ids in
order, ``kv_last_page_len[i]`` how many tokens its last page holds.

Planning once per step. FlashInfer splits work in ``plan()`` (host-side scheduling, a copy of
the page table to the GPU) and ``run()``; plan costs tens of microseconds and must not run per
layer. The Protocol gives the backend no step boundary, so it memoises: the first layer's call
of a step plans, keyed by the identity of that step's AttentionMetadata object (ModelRunner
builds one per step and passes the same object to every layer) plus the attention geometry, and
later layers that bring the same object reuse the plan. The backend keeps a reference to that
object, so its id cannot be recycled by a later step's metadata while the comparison is made.
The memo changes no result, only what is recomputed; like the engine that drives it, an instance
is for one thread.

FlashInfer has no float32 kernels: float32 attention, and every KV store, go to a fallback
backend (Triton where it imports, else the torch reference).

flashinfer is imported when the backend is built, never when this module is, so importing
tandem needs no flashinfer; the plan inputs are plain torch and tested on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tandem.kernels.interface import AttentionBackend, AttentionMetadata, BackendKind

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's split-KV scratch; its examples use 128 MiB
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class PagedKVPlanInputs:
    """FlashInfer's page-table arguments for one step. The indptrs and last_page_len stay on the host
    (plan() reads them there; a device copy would force a sync); kv_indices live with block_tables."""

    qo_indptr: torch.Tensor  # [num_seqs + 1] int32, host: cumulative query lengths
    kv_indptr: torch.Tensor  # [num_seqs + 1] int32, host: cumulative page counts
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int32, block_tables' device: pages of all sequences
    kv_last_page_len: torch.Tensor  # [num_seqs] int32, host: tokens in each last page, 1..page_size


def plan_inputs(meta: AttentionMetadata) -> PagedKVPlanInputs:
    """The CSR page table of a step, from its block tables and host-side lengths; no device sync."""
    block_size = meta.block_size
    pages = [-(-seq_len // block_size) for seq_len in meta.seq_lens_cpu]
    max_blocks = meta.block_tables.shape[1]
    if any(n > max_blocks for n in pages):
        raise ValueError(f"a sequence needs more than the {max_blocks} blocks its block table holds")
    # Flat positions of each sequence's first pages in the padded table, built on the host so one
    # index_select on the device picks them (boolean masking would sync to size its result).
    flat = [row * max_blocks + col for row, n in enumerate(pages) for col in range(n)]
    index = torch.tensor(flat, dtype=torch.long).to(meta.block_tables.device, non_blocking=True)
    return PagedKVPlanInputs(
        qo_indptr=_cumsum_from_zero(meta.query_lens_cpu),
        kv_indptr=_cumsum_from_zero(pages),
        kv_indices=meta.block_tables.reshape(-1).index_select(0, index).to(torch.int32),
        kv_last_page_len=torch.tensor(
            [seq_len - (n - 1) * block_size for seq_len, n in zip(meta.seq_lens_cpu, pages)], dtype=torch.int32
        ),
    )


def _cumsum_from_zero(values: tuple[int, ...] | list[int]) -> torch.Tensor:
    out, total = [0], 0
    for v in values:
        total += v
        out.append(total)
    return torch.tensor(out, dtype=torch.int32)


@dataclass(frozen=True, slots=True)
class _Plan:
    meta: AttentionMetadata  # held, so that ``meta is plan.meta`` cannot match a recycled id
    geometry: tuple  # (scale, q dtype, kv dtype, num_heads, num_kv_heads, head_dim)
    wrapper: Any


class FlashInferBackend:
    """FlashInfer decode and prefill; raises ImportError on construction without flashinfer."""

    kind = BackendKind.FLASHINFER

    def __init__(self, fallback: AttentionBackend) -> None:
        import flashinfer  # lazily: only a CUDA worker that picked this backend needs it

        self._flashinfer = flashinfer
        self._fallback = fallback
        self._workspace: torch.Tensor | None = None
        self._decode_wrappers: dict[bool, Any] = {}  # by use_tensor_cores
        self._prefill_wrapper: Any = None
        self._plan: _Plan | None = None

    def store_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        self._fallback.store_kv(kv_cache, key, value, meta)

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """query [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]."""
        if query.dtype not in FLASHINFER_DTYPES:
            return self._fallback.attend(query, kv_cache, meta, scale)
        wrapper = self._planned_wrapper(query, kv_cache, meta, scale)
        return wrapper.run(query.contiguous(), kv_cache)

    def _planned_wrapper(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> Any:
        """This step's planned wrapper: planned on the step's first call, reused by its other layers."""
        _, num_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        geometry = (scale, query.dtype, kv_cache.dtype, num_heads, num_kv_heads, head_dim)
        plan = self._plan
        if plan is not None and plan.meta is meta and plan.geometry == geometry:
            return plan.wrapper
        inputs = plan_inputs(meta)
        dtypes = dict(q_data_type=query.dtype, kv_data_type=kv_cache.dtype, sm_scale=scale)
        if meta.is_decode_only:
            wrapper = self._decode_wrapper(query.device, use_tensor_cores=num_heads // num_kv_heads >= 4)
            wrapper.plan(
                inputs.kv_indptr, inputs.kv_indices, inputs.kv_last_page_len,
                num_heads, num_kv_heads, head_dim, meta.block_size, **dtypes,
            )
        else:
            wrapper = self._prefill(query.device)
            wrapper.plan(
                inputs.qo_indptr, inputs.kv_indptr, inputs.kv_indices, inputs.kv_last_page_len,
                num_heads, num_kv_heads, head_dim, meta.block_size, causal=True, **dtypes,
            )
        self._plan = _Plan(meta, geometry, wrapper)
        return wrapper

    def _decode_wrapper(self, device: torch.device, use_tensor_cores: bool) -> Any:
        """Tensor-core decode pays off from a group of 4 query heads per kv head (Llama-3 8B/70B)."""
        if use_tensor_cores not in self._decode_wrappers:
            self._decode_wrappers[use_tensor_cores] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace_on(device), "NHD", use_tensor_cores=use_tensor_cores
            )
        return self._decode_wrappers[use_tensor_cores]

    def _prefill(self, device: torch.device) -> Any:
        if self._prefill_wrapper is None:
            self._prefill_wrapper = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self._workspace_on(device), "NHD"
            )
        return self._prefill_wrapper

    def _workspace_on(self, device: torch.device) -> torch.Tensor:
        """One scratch buffer shared by both wrappers: a step runs only one of them."""
        if self._workspace is None:
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        elif self._workspace.device != device:
            raise ValueError(f"FlashInferBackend serves {self._workspace.device}, got a tensor on {device}")
        return self._workspace
