"""Each Triton kernel against the torch reference (interpreter on the CPU, compiled on a GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_steps import DEVICE, LAYER, paged_step, random_cache  # noqa: E402
from tandem.kernels.torch_reference import TorchReferenceBackend  # noqa: E402
from tandem.kernels.triton_attention import paged_decode_attention  # noqa: E402
from tandem.kernels.triton_kv import gather_rows, scatter_rows, store_kv  # noqa: E402
from tandem.kvtransfer.staging import as_words  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_equals_reference_bytes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    block_size, kv_heads, heads, head_dim = 4, 2, 4, 24  # head_dim not a power of two
    full, _ = random_cache(16, block_size, kv_heads, head_dim, dtype, gen)
    expected = full.clone()
    meta = paged_step([0, 5, 3], [6, 1, 9], block_size, 16, gen)
    # Keys and values as slices of a fused qkv projection: token stride is not kv_heads * head_dim.
    qkv = torch.randn(16, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(16, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(16, kv_heads, head_dim)
    store_kv(full[:, LAYER], key, value, meta.slot_mapping, block_size)
    TorchReferenceBackend().store_kv(expected[:, LAYER], key, value, meta)
    assert torch.equal(full, expected)  # the stored slots, and nothing else in any layer


def test_store_kv_skips_negative_slots() -> None:
    gen = torch.Generator().manual_seed(2)
    full, layer = random_cache(4, 4, 1, 8, torch.float32, gen)
    before = full.clone()
    key = torch.ones(2, 1, 8, device=DEVICE)
    store_kv(layer, key, key * 2, torch.tensor([-1, 5], device=DEVICE), 4)
    assert layer[1, 0, 1].eq(1).all() and layer[1, 1, 1].eq(2).all()
    layer[1, :, 1] = before[1, LAYER, :, 1]
    assert torch.equal(full, before)


DECODE_CASES = {  # cached context lengths; block size 16, so 1, 15, 16, 17, 40 cover partial pages
    "mixed": [0, 14, 15, 16, 39, 70],
    "one_long": [300],
}


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_matches_reference_fp32(case: str, num_splits: int | None, group: int) -> None:
    cached = DECODE_CASES[case]
    gen = torch.Generator().manual_seed(len(cached) * 7 + group)
    block_size, kv_heads, head_dim, num_blocks = 16, 2, 32, 64
    _, layer = random_cache(num_blocks, block_size, kv_heads, head_dim, torch.float32, gen)
    meta = paged_step(cached, [1] * len(cached), block_size, num_blocks, gen)
    query = torch.randn(len(cached), kv_heads * group, head_dim, generator=gen).to(DEVICE)
    scale = head_dim**-0.5
    out = paged_decode_attention(
        query, layer, meta.block_tables, meta.seq_lens, scale, max(meta.seq_lens_cpu), num_splits=num_splits
    )
    expected = TorchReferenceBackend().attend(query, layer, meta, scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_16_bit_and_odd_shapes(dtype: torch.dtype) -> None:
    """16-bit in and out (fp32 accumulation; fp16 takes the tl.dot path in the interpreter too);
    3 query heads per kv head and head_dim 40 need padding."""
    gen = torch.Generator().manual_seed(3)
    block_size, kv_heads, head_dim, num_blocks = 8, 2, 40, 32
    _, layer = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    meta = paged_step([5, 30, 0], [1, 1, 1], block_size, num_blocks, gen)
    query = torch.randn(3, kv_heads * 3, head_dim, generator=gen).to(DEVICE, dtype)
    for num_splits in (1, 2):
        out = paged_decode_attention(query, layer, meta.block_tables, meta.seq_lens, 0.2, 31, num_splits=num_splits)
        expected = TorchReferenceBackend().attend(query.float(), layer.float(), meta, 0.2)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("width", [40, 37])  # words (int64 view) and odd bytes (uint8 rows)
def test_gather_then_scatter_moves_exact_bytes(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    rows = torch.randint(0, 256, (12, width), generator=gen, dtype=torch.uint8).to(DEVICE)
    block_ids = torch.tensor([7, 2, 11, 0, 5], device=DEVICE)
    slots = torch.zeros(6, width, dtype=torch.uint8, device=DEVICE)  # one slot more than needed
    gather_rows(as_words(slots[:5]), as_words(rows), block_ids)
    assert torch.equal(slots[:5], rows[block_ids]) and slots[5].eq(0).all()
    target = torch.zeros_like(rows)
    scatter_rows(as_words(target), block_ids, as_words(slots[:5]))
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[block_ids.cpu()] = False
    assert torch.equal(target[block_ids], rows[block_ids]) and target[untouched.to(DEVICE)].eq(0).all()


def test_copy_rows_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError):
        gather_rows(torch.zeros(2, 8, device=DEVICE), torch.zeros(4, 9, device=DEVICE), torch.tensor([0, 1], device=DEVICE))
