"""Choosing the attention backend once, at start, from what the device supports.

On CUDA: FlashInfer if it imports and a tiny smoke call agrees with the torch reference, else
Triton under the same test, else the torch reference; every choice and every reason a better
backend was passed over is logged. A backend that imports but fails on this GPU (no kernel for
the architecture, a JIT compile that breaks) is caught here rather than in the first request.
On the CPU: attention and the KV store in C where the kernel can be built (kernels/cpu_attention.py),
else the torch reference. Other devices run the torch reference.

``TANDEM_ATTENTION_BACKEND=torch|cpu|triton|flashinfer`` overrides the choice; an override that
cannot be honoured fails loudly instead of falling back, since whoever set it wants that
backend measured. Triton kernels run off-GPU only in Triton's interpreter (TRITON_INTERPRET=1).
Backend modules are imported here lazily, so importing tandem needs neither triton nor flashinfer.
"""
from __future__ import annotations

import logging
import os

import torch

from tandem.kernels import cpu_attention
from tandem.kernels.interface import AttentionBackend, AttentionMetadata, BackendKind
from tandem.kernels.torch_reference import TorchReferenceBackend

logger = logging.getLogger(__name__)

ENV_VAR = "TANDEM_ATTENTION_BACKEND"


def select_backend(device: torch.device) -> AttentionBackend:
    """The attention backend for ``device``; logs which one and why."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        kind = parse_backend_kind(override)
        backend = _build_override(kind, device)
        logger.info("attention backend: %s on %s (%s=%s)", kind.value, device, ENV_VAR, override)
        return backend
    if device.type == "cpu" and cpu_attention.library() is not None:
        logger.info("attention backend: cpu (attention and the KV store in a C kernel)")
        return cpu_attention.CpuBackend()
    if device.type != "cuda":
        logger.info("attention backend: torch reference on %s (only the torch reference runs on %s)", device, device.type)
        return TorchReferenceBackend()
    passed_over: list[str] = []
    for kind in (BackendKind.FLASHINFER, BackendKind.TRITON):
        try:
            backend = build_backend(kind)
            smoke_test(backend, device)
        except Exception as e:  # noqa: BLE001 - any failure means "not this one"; the reason is logged
            passed_over.append(f"{kind.value}: {type(e).__name__}: {e}")
            continue
        logger.info("attention backend: %s on %s%s", kind.value, device, _passed_over(passed_over))
        return backend
    logger.warning("attention backend: torch reference on %s%s", device, _passed_over(passed_over))
    return TorchReferenceBackend()


def parse_backend_kind(value: str) -> BackendKind:
    """A BackendKind from its value ("torch", "triton", "flashinfer"); ValueError naming the choices."""
    try:
        return BackendKind(value.strip().lower())
    except ValueError:
        choices = "|".join(k.value for k in BackendKind)
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {choices}") from None


def build_backend(kind: BackendKind) -> AttentionBackend:
    """An instance of ``kind``; ImportError when its library is missing."""
    if kind is BackendKind.TORCH_REFERENCE:
        return TorchReferenceBackend()
    if kind is BackendKind.CPU:
        if cpu_attention.library() is None:
            raise ImportError("the C attention kernel could not be built (the log says why)")
        return cpu_attention.CpuBackend()
    if kind is BackendKind.TRITON:
        from tandem.kernels.triton_backend import TritonBackend

        return TritonBackend()
    from tandem.kernels.flashinfer_backend import FlashInferBackend

    try:
        fallback: AttentionBackend = build_backend(BackendKind.TRITON)
    except ImportError:
        fallback = TorchReferenceBackend()
    return FlashInferBackend(fallback)


def _build_override(kind: BackendKind, device: torch.device) -> AttentionBackend:
    if kind is BackendKind.CPU and device.type != "cpu":
        raise ValueError(f"{ENV_VAR}=cpu needs the CPU device, got {device}")
    if kind is BackendKind.FLASHINFER and device.type != "cuda":
        raise ValueError(f"{ENV_VAR}=flashinfer needs a CUDA device, got {device}")
    if kind is BackendKind.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{ENV_VAR}=triton needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
    try:
        return build_backend(kind)
    except ImportError as e:
        raise RuntimeError(f"{ENV_VAR}={kind.value}, but it does not import: {e}") from e


def _passed_over(reasons: list[str]) -> str:
    return f" (passed over: {'; '.join(reasons)})" if reasons else ""


def smoke_test(backend: AttentionBackend, device: torch.device) -> None:
    """Store and attend two tiny bfloat16 steps (a decode batch, then a decode plus a prefill; GQA, a
    strided cache view) through ``backend`` and the torch reference; raises if they disagree."""
    block_size, num_kv_heads, num_heads, head_dim = 16, 2, 8, 128
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(8, 2, 2, block_size, num_kv_heads, head_dim, generator=gen).to(device, torch.bfloat16)
    expected = full.clone()
    reference = TorchReferenceBackend()
    tables = [[5, 2], [6, 0]]
    for query_lens, seq_lens in (((1, 1), (21, 3)), ((1, 9), (22, 12))):
        meta = _smoke_metadata(query_lens, seq_lens, tables, block_size, device)
        num_tokens = sum(query_lens)
        key, value, query = (
            torch.randn(num_tokens, h, head_dim, generator=gen).to(device, torch.bfloat16)
            for h in (num_kv_heads, num_kv_heads, num_heads)
        )
        backend.store_kv(full[:, 1], key, value, meta)
        reference.store_kv(expected[:, 1], key, value, meta)
        if not torch.equal(full, expected):
            raise RuntimeError("smoke test: store_kv wrote other bytes than the torch reference")
        got = backend.attend(query, full[:, 1], meta, head_dim**-0.5).float()
        want = reference.attend(query, expected[:, 1], meta, head_dim**-0.5).float()
        if not torch.allclose(got, want, atol=3e-2, rtol=3e-2):
            raise RuntimeError(f"smoke test: attention differs from the torch reference by {(got - want).abs().max()}")


def _smoke_metadata(
    query_lens: tuple[int, ...], seq_lens: tuple[int, ...], tables: list[list[int]], block_size: int, device: torch.device
) -> AttentionMetadata:
    """Metadata of a step appending query_lens[i] tokens to sequence i, ending at seq_lens[i]."""
    slots = [
        tables[i][pos // block_size] * block_size + pos % block_size
        for i, (q, n) in enumerate(zip(query_lens, seq_lens))
        for pos in range(n - q, n)
    ]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
