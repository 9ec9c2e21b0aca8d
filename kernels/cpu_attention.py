"""The CPU attention backend: paged attention and the KV store in a C kernel
(kernels/cpu_attention.c) that reads and writes the cache in place through the block tables,
for every kind of step (prefill, chunked prefill, decode, mixed).

The torch reference gathers each sequence's keys and values into a padded tensor, builds a mask
and calls flash attention sized for long queries, which costs more than the arithmetic at decode
sizes (7 of 43 ms in a batch-16 SmolLM2 step on the 2-core VM) and once per sequence and layer in
a prefill. The result differs from the reference only by rounding (summation order, the vector
exp of cpu_vector.h). Tensors the kernel does not take (bfloat16, a cache whose heads are not
contiguous) go to the reference.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from tandem.kernels.interface import AttentionMetadata, BackendKind
from tandem.kernels.native_build import load_native
from tandem.kernels.torch_reference import TorchReferenceBackend

SOURCE = Path(__file__).with_name("cpu_attention.c")
_INT, _LONG, _POINTER = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
_SIGNATURES = {
    "paged_attention": (_INT, [
        _POINTER, _POINTER, _LONG, _LONG, _LONG, _LONG, _POINTER, _INT, _POINTER, _POINTER,
        _INT, _INT, _INT, _INT, _INT, ctypes.c_float, _POINTER,
    ]),
    "store_kv": (None, [
        _POINTER, _LONG, _LONG, _LONG, _POINTER, _LONG, _POINTER, _LONG, _POINTER, _INT, _INT, _INT,
    ]),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built (the reason is logged once)."""
    return load_native(SOURCE, _SIGNATURES)


class CpuBackend(TorchReferenceBackend):
    """Stateless; safe to share between layers, models and threads."""

    kind = BackendKind.CPU

    def store_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        native = library()
        if native is None or not (_cache_fits(kv_cache) and _rows_fit(key) and _rows_fit(value)):
            return super().store_kv(kv_cache, key, value, meta)
        block_stride, kind_stride, token_stride, _, _ = kv_cache.stride()
        slots = meta.slot_mapping.contiguous()
        native.store_kv(
            kv_cache.data_ptr(), block_stride, kind_stride, token_stride, key.data_ptr(), key.stride(0),
            value.data_ptr(), value.stride(0), slots.data_ptr(), key.shape[0], key.shape[1] * key.shape[2],
            meta.block_size,
        )

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        native = library()
        if native is None or not (_cache_fits(kv_cache) and query.dtype == torch.float32):
            return super().attend(query, kv_cache, meta, scale)
        num_tokens, num_heads, head_dim = query.shape
        query = query.contiguous()
        tables = meta.block_tables.contiguous()
        out = torch.empty_like(query)
        block_stride, kind_stride, token_stride, head_stride, _ = kv_cache.stride()
        status = native.paged_attention(
            query.data_ptr(), kv_cache.data_ptr(), block_stride, kind_stride, token_stride, head_stride,
            tables.data_ptr(), tables.shape[1], meta.query_start_loc.contiguous().data_ptr(),
            meta.seq_lens.contiguous().data_ptr(), meta.num_seqs, num_heads, kv_cache.shape[3], head_dim,
            meta.block_size, scale, out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("paged_attention could not allocate its scores buffer")
        return out


def _cache_fits(kv_cache: torch.Tensor) -> bool:
    """A float32 CPU cache view [blocks, 2, block_size, kv_heads, head_dim] whose heads are
    contiguous within a token: what the C kernel addresses."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype == torch.float32
        and kv_cache.stride(4) == 1
        and kv_cache.stride(3) == kv_cache.shape[4]
        and kv_cache.stride(2) == kv_cache.shape[3] * kv_cache.shape[4]
    )


def _rows_fit(t: torch.Tensor) -> bool:
    """[tokens, kv_heads, head_dim] float32 with each token's heads contiguous (rows may be strided)."""
    return t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == t.shape[2]
