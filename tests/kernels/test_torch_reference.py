"""TorchReferenceBackend against naive dense causal attention over the same keys and values."""
from __future__ import annotations

import logging

import pytest
import torch

from paged_steps import metadata_for, shuffled_block_tables
from tandem.kernels import cpu_attention
from tandem.kernels.cpu_attention import CpuBackend
from tandem.kernels.interface import AttentionMetadata, BackendKind
from tandem.kernels.select import select_backend
from tandem.kernels.torch_reference import TorchReferenceBackend

NUM_LAYERS = 3
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
LAYER = 1  # the layer under test, in the middle of the block-major cache


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [ql, H, D] are the last ql positions of k/v [L, KVH, D]; dense softmax with a causal mask."""
    query_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(
    cached_lens: list[int], query_lens: list[int], block_size: int, device: str, dtype: torch.dtype = torch.float32,
    backend: TorchReferenceBackend | None = None, head_dim: int = 16,
) -> None:
    gen = torch.Generator().manual_seed(sum(cached_lens) * 31 + sum(query_lens) + block_size)
    num_heads, num_kv_heads, num_blocks = 8, 2, 64
    scale = head_dim**-0.5
    # Block-major cache of all layers filled with huge finite garbage, as stale blocks would be:
    # a slot read without being written, or a padding slot given any weight, wrecks the output.
    full = torch.full((num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim), 1.0e4)
    tables = shuffled_block_tables(cached_lens, query_lens, block_size, num_blocks, gen)
    meta = metadata_for(tables, cached_lens, query_lens, block_size, device)
    full = full.to(device, dtype)
    kv_cache = full[:, LAYER]
    backend = backend or TorchReferenceBackend()
    seq_k = [torch.randn(c + q, num_kv_heads, head_dim, generator=gen) for c, q in zip(cached_lens, query_lens)]
    seq_v = [torch.randn(c + q, num_kv_heads, head_dim, generator=gen) for c, q in zip(cached_lens, query_lens)]
    # The cached prefixes were written by earlier steps: store them through the same slot arithmetic.
    if sum(cached_lens):
        prefix = metadata_for(tables, [0] * len(cached_lens), cached_lens, block_size, device)
        prefix_k, prefix_v = prefix_kv(seq_k, seq_v, cached_lens)
        backend.store_kv(kv_cache, prefix_k.to(device, dtype), prefix_v.to(device, dtype), prefix)
    new_k = torch.cat([k[c:] for k, c in zip(seq_k, cached_lens)])
    new_v = torch.cat([v[c:] for v, c in zip(seq_v, cached_lens)])
    backend.store_kv(kv_cache, new_k.to(device, dtype), new_v.to(device, dtype), meta)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    out = backend.attend(query.to(device, dtype), kv_cache, meta, scale).float().cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    start = 0
    for k, v, q_len in zip(seq_k, seq_v, query_lens):
        expected = naive_attention(*(t.to(dtype).float() for t in (query[start : start + q_len], k, v)), scale)
        torch.testing.assert_close(out[start : start + q_len], expected, atol=tolerance, rtol=tolerance)
        start += q_len
    assert (full[:, LAYER - 1] == 1.0e4).all() and (full[:, LAYER + 1] == 1.0e4).all()  # other layers untouched


def prefix_kv(
    seq_k: list[torch.Tensor], seq_v: list[torch.Tensor], cached_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.cat([k[:c] for k, c in zip(seq_k, cached_lens)]),
        torch.cat([v[:c] for v, c in zip(seq_v, cached_lens)]),
    )


# The CPU backend (C kernels) wherever its kernel builds, beside the reference it extends.
CPU_BACKENDS = [TorchReferenceBackend(), *([CpuBackend()] if cpu_attention.library() is not None else [])]
DEVICE_BACKENDS = [("cpu", b) for b in CPU_BACKENDS] + [("cuda", TorchReferenceBackend())] * (len(DEVICES) - 1)


def _ids(case: tuple[str, TorchReferenceBackend]) -> str:
    return f"{case[0]}-{case[1].kind.value}"


@pytest.mark.parametrize("case", DEVICE_BACKENDS, ids=_ids)
@pytest.mark.parametrize("block_size", [4, 16])
def test_pure_prefill(block_size: int, case: tuple[str, TorchReferenceBackend]) -> None:
    device, backend = case
    run_case(cached_lens=[0, 0, 0], query_lens=[7, 1, 23], block_size=block_size, device=device, backend=backend)


@pytest.mark.parametrize("case", DEVICE_BACKENDS, ids=_ids)
@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_continues_cached_prefix(block_size: int, case: tuple[str, TorchReferenceBackend]) -> None:
    device, backend = case
    run_case(cached_lens=[5, 16, 0], query_lens=[9, 3, 4], block_size=block_size, device=device, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DEVICE_BACKENDS, ids=_ids)
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_batch(block_size: int, case: tuple[str, TorchReferenceBackend], dtype: torch.dtype) -> None:
    device, backend = case
    run_case(cached_lens=[0, 3, 16, 30, 8], query_lens=[1, 1, 1, 1, 1], block_size=block_size, device=device,
             dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.kind.value)
@pytest.mark.parametrize("head_dim", [24, 64])
def test_decode_over_long_contexts_and_uneven_head_dims(backend: TorchReferenceBackend, head_dim: int) -> None:
    """Contexts over many blocks (one sequence on 30 of them) and a head_dim the C kernel's 16-wide
    vectors do not divide."""
    run_case(cached_lens=[470, 2, 61], query_lens=[1, 1, 1], block_size=16, device="cpu", backend=backend,
             head_dim=head_dim)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.kind.value)
def test_many_sequences(backend: TorchReferenceBackend) -> None:
    """Enough sequences that the C kernel's threads take whole sequences, not single key/value heads."""
    run_case(cached_lens=[3 * i for i in range(12)], query_lens=[1] * 12, block_size=4, device="cpu", backend=backend)
    run_case(cached_lens=[2 * i for i in range(12)], query_lens=[1, 5] * 6, block_size=4, device="cpu", backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DEVICE_BACKENDS, ids=_ids)
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_prefill_and_decode(block_size: int, case: tuple[str, TorchReferenceBackend], dtype: torch.dtype) -> None:
    device, backend = case
    run_case(cached_lens=[12, 0, 6, 1], query_lens=[1, 10, 5, 1], block_size=block_size, device=device,
             dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.kind.value)
def test_store_kv_writes_only_its_slots(backend: TorchReferenceBackend) -> None:
    block_size, kv_heads, head_dim = 4, 2, 8
    full = torch.zeros(6, NUM_LAYERS, 2, block_size, kv_heads, head_dim)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 2], dtype=torch.int32),
        seq_lens=torch.tensor([2], dtype=torch.int32),
        block_tables=torch.tensor([[5]], dtype=torch.int32),
        slot_mapping=torch.tensor([21, 22]),  # block 5, offsets 1 and 2
        query_lens_cpu=(2,),
        seq_lens_cpu=(2,),
        block_size=block_size,
    )
    key, value = torch.ones(2, kv_heads, head_dim), torch.full((2, kv_heads, head_dim), 2.0)
    backend.store_kv(full[:, LAYER], key, value, meta)
    assert full[5, LAYER, 0, 1:3].eq(1).all() and full[5, LAYER, 1, 1:3].eq(2).all()
    assert full.count_nonzero() == 2 * 2 * kv_heads * head_dim


def test_select_backend_logs_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tandem.kernels.select"):
        backend = select_backend(torch.device("cpu"))
    if cpu_attention.library() is None:
        assert backend.kind is BackendKind.TORCH_REFERENCE and "torch reference" in caplog.text
    else:
        assert backend.kind is BackendKind.CPU and "attention and the KV store in a C kernel" in caplog.text
