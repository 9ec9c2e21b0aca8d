"""The CPU attention backend: the torch reference, with decode-only steps in a C kernel
(kernels/cpu_attention.c) that reads keys and values in place through the block tables.

Prefill and mixed steps stay on the reference's per-sequence path: their attention is a small
part of a step that their matmuls dominate. A decode step is where the reference's gather into a
padded tensor, its mask and a flash-attention call sized for long queries cost more than the
arithmetic (7 of 43 ms in a batch-16 SmolLM2 step on the 2-core VM). The result differs from the
reference only by rounding (summation order, libm's expf).
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
    "paged_decode_attention": (_INT, [
        _POINTER, _POINTER, _LONG, _LONG, _LONG, _LONG, _POINTER, _INT, _POINTER,
        _INT, _INT, _INT, _INT, _INT, ctypes.c_float, _POINTER,
    ]),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built (the reason is logged once)."""
    return load_native(SOURCE, _SIGNATURES)


class CpuBackend(TorchReferenceBackend):
    """Stateless; safe to share between layers, models and threads."""

    kind = BackendKind.CPU

    def _attend_decode(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        native = library()
        if native is None or not _fits_kernel(query, kv_cache):
            return super()._attend_decode(query, kv_cache, meta, scale)
        num_seqs, num_heads, head_dim = query.shape
        query = query.contiguous()
        tables = meta.block_tables.contiguous()
        seq_lens = meta.seq_lens.contiguous()
        out = torch.empty_like(query)
        block_stride, kind_stride, token_stride, head_stride, _ = kv_cache.stride()
        status = native.paged_decode_attention(
            query.data_ptr(), kv_cache.data_ptr(), block_stride, kind_stride, token_stride, head_stride,
            tables.data_ptr(), tables.shape[1], seq_lens.data_ptr(), num_seqs, num_heads, kv_cache.shape[3],
            head_dim, meta.block_size, scale, out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("paged_decode_attention could not allocate its scores buffer")
        return out


def _fits_kernel(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """float32 on the CPU, head_dim contiguous: what the C kernel reads (bfloat16 stays on torch)."""
    return (
        query.device.type == "cpu"
        and query.dtype == torch.float32
        and kv_cache.dtype == torch.float32
        and kv_cache.stride(-1) == 1
    )
