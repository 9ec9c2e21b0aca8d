"""FlashInferBackend without FlashInfer: the page-table builder, and plan-once-per-step against a fake.

flashinfer cannot run on the CPU; the fake module stands in for its two wrappers and records
plan() calls, and computes run() with the torch reference so outputs can be checked too.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from paged_steps import DEVICE, paged_step, random_cache
from tandem.kernels.flashinfer_backend import FlashInferBackend, plan_inputs
from tandem.kernels.interface import AttentionMetadata, BackendKind
from tandem.kernels.torch_reference import TorchReferenceBackend


def test_plan_inputs_csr_page_table() -> None:
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 6, 7], dtype=torch.int32),
        seq_lens=torch.tensor([17, 5, 32], dtype=torch.int32),
        block_tables=torch.tensor([[9, 4, 0], [2, 0, 0], [7, 1, 0]], dtype=torch.int32),
        slot_mapping=torch.zeros(7, dtype=torch.int64),
        query_lens_cpu=(1, 5, 1),
        seq_lens_cpu=(17, 5, 32),
        block_size=16,
    )
    inputs = plan_inputs(meta)
    assert inputs.qo_indptr.tolist() == [0, 1, 6, 7]
    assert inputs.kv_indptr.tolist() == [0, 2, 3, 5]
    assert inputs.kv_indices.tolist() == [9, 4, 2, 7, 1]  # padding entries dropped
    assert inputs.kv_last_page_len.tolist() == [1, 5, 16]  # a full last page is 16, never 0
    assert all(t.dtype == torch.int32 for t in (inputs.qo_indptr, inputs.kv_indptr, inputs.kv_indices))
    assert inputs.kv_indptr.device.type == "cpu" and inputs.kv_last_page_len.device.type == "cpu"


def test_plan_inputs_from_random_step() -> None:
    gen = torch.Generator().manual_seed(5)
    meta = paged_step([0, 31, 7, 64], [12, 1, 1, 1], 8, 40, gen)
    inputs = plan_inputs(meta)
    table = meta.block_tables.cpu()
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        pages = inputs.kv_indices[inputs.kv_indptr[i] : inputs.kv_indptr[i + 1]].cpu()
        assert pages.tolist() == table[i, : -(-seq_len // 8)].tolist()
        assert (len(pages) - 1) * 8 + int(inputs.kv_last_page_len[i]) == seq_len


def test_plan_inputs_rejects_short_block_table() -> None:
    meta = paged_step([0], [9], 4, 8, torch.Generator().manual_seed(0))
    meta = AttentionMetadata(**{**{f: getattr(meta, f) for f in meta.__slots__}, "block_tables": meta.block_tables[:, :2]})
    with pytest.raises(ValueError, match="blocks"):
        plan_inputs(meta)


class _FakeWrapper:
    """Records plan() and answers run() with the torch reference over the planned step."""

    plans: list[tuple[str, dict]] = []

    def __init__(self, workspace: torch.Tensor, layout: str, **kwargs) -> None:
        assert layout == "NHD" and workspace.dtype == torch.uint8
        self.step: AttentionMetadata | None = None

    def plan(self, *args, **kwargs) -> None:
        _FakeWrapper.plans.append((type(self).__name__, kwargs))
        self.scale = kwargs["sm_scale"]

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        assert query.is_contiguous()
        return TorchReferenceBackend().attend(query, kv_cache, _CURRENT_META[0], self.scale)


class BatchDecodeWithPagedKVCacheWrapper(_FakeWrapper):
    pass


class BatchPrefillWithPagedKVCacheWrapper(_FakeWrapper):
    pass


_CURRENT_META: list[AttentionMetadata] = []


@pytest.fixture
def fake_flashinfer(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    module.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    _FakeWrapper.plans = []
    return _FakeWrapper.plans


def test_plans_once_per_step_and_reuses_for_later_layers(fake_flashinfer: list) -> None:
    gen = torch.Generator().manual_seed(6)
    _, layer = random_cache(32, 8, 2, 16, torch.float32, gen)
    layer = layer.to(torch.bfloat16)
    backend = FlashInferBackend(fallback=TorchReferenceBackend())
    assert backend.kind is BackendKind.FLASHINFER
    decode = paged_step([5, 20], [1, 1], 8, 32, gen)
    prefill = paged_step([0, 3], [4, 1], 8, 32, gen)
    for meta, wrapper in ((decode, "BatchDecodeWithPagedKVCacheWrapper"), (prefill, "BatchPrefillWithPagedKVCacheWrapper")):
        _CURRENT_META[:] = [meta]
        query = torch.randn(sum(meta.query_lens_cpu), 8, 16, generator=gen).to(DEVICE, torch.bfloat16)
        before = len(fake_flashinfer)
        for _ in range(3):  # three layers of one step
            out = backend.attend(query, layer, meta, 0.25)
        assert len(fake_flashinfer) == before + 1 and fake_flashinfer[-1][0] == wrapper
        assert fake_flashinfer[-1][1]["q_data_type"] == torch.bfloat16
        torch.testing.assert_close(out, TorchReferenceBackend().attend(query, layer, meta, 0.25))
    assert fake_flashinfer[-1][1].get("causal") is True
    backend.attend(query, layer, meta, 0.5)  # another scale in the same step: planned again
    assert len(fake_flashinfer) == 3


def test_float32_and_store_go_to_fallback(fake_flashinfer: list) -> None:
    gen = torch.Generator().manual_seed(7)
    full, layer = random_cache(16, 4, 1, 8, torch.float32, gen)
    meta = paged_step([3], [1], 4, 16, gen)
    backend = FlashInferBackend(fallback=TorchReferenceBackend())
    key = torch.randn(1, 1, 8, generator=gen).to(DEVICE)
    backend.store_kv(layer, key, key, meta)
    slot = int(meta.slot_mapping[0])
    assert torch.equal(layer[slot // 4, 0, slot % 4], key[0])
    query = torch.randn(1, 2, 8, generator=gen).to(DEVICE)
    out = backend.attend(query, layer, meta, 0.3)
    torch.testing.assert_close(out, TorchReferenceBackend().attend(query, layer, meta, 0.3))
    assert fake_flashinfer == []


def test_construction_needs_flashinfer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    with pytest.raises(ImportError):
        FlashInferBackend(fallback=TorchReferenceBackend())
