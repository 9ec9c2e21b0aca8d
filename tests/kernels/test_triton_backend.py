"""TritonBackend against the torch reference: decode through the Triton kernel, prefill delegated."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_steps import DEVICE, paged_step, random_cache  # noqa: E402
from tandem.kernels.interface import BackendKind  # noqa: E402
from tandem.kernels.select import smoke_test  # noqa: E402
from tandem.kernels.torch_reference import TorchReferenceBackend  # noqa: E402
from tandem.kernels.triton_backend import TritonBackend  # noqa: E402


@pytest.mark.parametrize(
    "cached_lens, query_lens",
    [([3, 16, 40], [1, 1, 1]), ([12, 0, 6], [1, 10, 5])],
    ids=["decode", "mixed_prefill_decode"],
)
def test_store_and_attend_match_reference(cached_lens: list[int], query_lens: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(cached_lens))
    block_size, kv_heads, heads, head_dim, num_blocks = 8, 2, 8, 16, 32
    full, layer = random_cache(num_blocks, block_size, kv_heads, head_dim, torch.float32, gen)
    expected_full = full.clone()
    expected_layer = expected_full[:, 1]
    meta = paged_step(cached_lens, query_lens, block_size, num_blocks, gen)
    num_tokens = sum(query_lens)
    key, value = (torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    query = torch.randn(num_tokens, heads, head_dim, generator=gen).to(DEVICE)
    backend, reference = TritonBackend(), TorchReferenceBackend()
    backend.store_kv(layer, key, value, meta)
    reference.store_kv(expected_layer, key, value, meta)
    assert torch.equal(full, expected_full)
    out = backend.attend(query, layer, meta, 0.25)
    torch.testing.assert_close(out, reference.attend(query, expected_layer, meta, 0.25), atol=1e-5, rtol=1e-5)


def test_kind_and_smoke_test() -> None:
    backend = TritonBackend()
    assert backend.kind is BackendKind.TRITON
    smoke_test(backend, torch.device(DEVICE))  # the check select_backend runs on a GPU
