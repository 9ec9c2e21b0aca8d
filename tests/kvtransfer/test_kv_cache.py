"""KV-cache tensor: block-major layout, sizing from a budget, per-layer views."""

import os

import pytest
import torch

from tandem.kvtransfer.kv_cache import KVCacheSpec, allocate_kv_cache, layer_views, num_blocks_for_budget

CPU = torch.device("cpu")
SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)


def test_bytes_per_block() -> None:
    assert SPEC.bytes_per_block == 2 * 3 * 4 * 2 * 8 * 2
    assert KVCacheSpec(32, 8, 128, 16, torch.bfloat16).bytes_per_block == 2 * 32 * 16 * 8 * 128 * 2
    assert KVCacheSpec(1, 1, 1, 1, torch.float32).bytes_per_block == 8


def test_spec_rejects_empty_dimensions() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=0, block_size=16, dtype=torch.float16)


def test_one_block_of_all_layers_is_contiguous() -> None:
    kv_cache = allocate_kv_cache(SPEC, num_blocks=5, device=CPU)
    assert kv_cache.shape == (5, 3, 2, 4, 2, 8)
    assert kv_cache.dtype == torch.float16 and kv_cache.is_contiguous()
    assert bool((kv_cache == 0).all())
    for b in range(5):
        block = kv_cache[b]
        assert block.is_contiguous()
        assert block.numel() * block.element_size() == SPEC.bytes_per_block
        assert block.data_ptr() == kv_cache.data_ptr() + b * SPEC.bytes_per_block


def test_layer_views_write_into_the_shared_tensor() -> None:
    kv_cache = allocate_kv_cache(SPEC, num_blocks=5, device=CPU)
    views = layer_views(kv_cache)
    assert len(views) == 3
    for view in views:
        assert view.shape == (5, 2, 4, 2, 8)
        assert not view.is_contiguous()
        assert view.stride(0) == 3 * 2 * 4 * 2 * 8  # page stride spans all layers
    block, layer, kv, slot, head, dim = 3, 1, 1, 2, 1, 5
    views[layer][block, kv, slot, head, dim] = 7.0
    flat = ((((block * 3 + layer) * 2 + kv) * 4 + slot) * 2 + head) * 8 + dim
    assert kv_cache.view(-1)[flat].item() == 7.0
    assert kv_cache[block, layer, kv, slot, head, dim].item() == 7.0
    assert int((kv_cache != 0).sum()) == 1
    views[0][:, 0] = 1.0  # all K of layer 0
    assert bool((kv_cache[:, 0, 0] == 1).all()) and bool((kv_cache[:, 0, 1] == 0).all())
    assert bool((kv_cache[:, 2] == 0).all())


def test_layer_views_rejects_other_layouts() -> None:
    with pytest.raises(ValueError):
        layer_views(torch.zeros(5, 3, 4, 2, 8))


def test_allocate_rejects_zero_blocks() -> None:
    with pytest.raises(ValueError):
        allocate_kv_cache(SPEC, num_blocks=0, device=CPU)


def test_budget_in_bytes() -> None:
    bpb = SPEC.bytes_per_block
    assert num_blocks_for_budget(SPEC, num_bytes=10 * bpb, device=CPU) == 10
    assert num_blocks_for_budget(SPEC, num_bytes=11 * bpb - 1, device=CPU) == 10
    assert num_blocks_for_budget(SPEC, num_bytes=bpb, device=CPU) == 1
    with pytest.raises(ValueError, match="smaller than one block"):
        num_blocks_for_budget(SPEC, num_bytes=bpb - 1, device=CPU)


def test_budget_needs_exactly_one_of_bytes_and_fraction() -> None:
    with pytest.raises(ValueError, match="num_bytes and memory_fraction"):
        num_blocks_for_budget(SPEC, device=CPU)
    with pytest.raises(ValueError, match="num_bytes and memory_fraction"):
        num_blocks_for_budget(SPEC, num_bytes=10**6, memory_fraction=0.5, device=CPU)
    with pytest.raises(ValueError, match="memory_fraction"):
        num_blocks_for_budget(SPEC, memory_fraction=1.5, device=CPU)


def test_fraction_of_physical_ram_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"SC_PAGE_SIZE": 256, "SC_PHYS_PAGES": 1000 * SPEC.bytes_per_block // 256}
    monkeypatch.setattr(os, "sysconf", lambda name: values[name])
    total = values["SC_PAGE_SIZE"] * values["SC_PHYS_PAGES"]
    expected = int(total * 0.25) // SPEC.bytes_per_block
    assert num_blocks_for_budget(SPEC, memory_fraction=0.25, device=CPU) == expected == 250


def test_fraction_of_total_gpu_memory_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    total = 4000 * SPEC.bytes_per_block
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total // 10, total))
    got = num_blocks_for_budget(SPEC, memory_fraction=0.5, device=torch.device("cuda", 0))
    assert got == 2000  # of total memory, not of the free part
