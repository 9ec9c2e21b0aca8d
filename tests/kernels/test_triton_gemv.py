"""The one-row Triton GEMV against the exact product: interpreter on the CPU, compiled on a GPU.

Its fp32 sum is rounded once to the 16-bit dtype, so it lies within one unit in the last place of
the float32 product (the interpreter truncates bfloat16 casts, so one ulp, not half)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_steps import DEVICE  # noqa: E402
from tandem.kernels.triton_gemv import gemv, supports  # noqa: E402


def _within_one_ulp(actual: torch.Tensor, exact: torch.Tensor) -> None:
    eps = torch.finfo(actual.dtype).eps
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-3)))) * eps
    err = (actual.float() - exact).abs()
    assert bool((err <= ulp * 1.001 + 1e-5).all()), f"max error {(err / ulp).max().item():.2f} ulps"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(70, 300), (8, 2048), (13, 1500)])
def test_gemv_is_the_product_rounded_once(dtype: torch.dtype, with_bias: bool, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    got = gemv(x.to(DEVICE), weight.to(DEVICE), None if bias is None else bias.to(DEVICE)).cpu()
    assert got.shape == (1, n) and got.dtype == dtype
    _within_one_ulp(got, exact.float())


def test_gemv_takes_one_16_bit_row_only_and_names_a_misfit() -> None:
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not supports(torch.zeros(1, 8, dtype=torch.bfloat16), w)  # CPU tensors: torch's matmul
    if torch.cuda.is_available():
        cw = w.cuda()
        assert supports(torch.zeros(1, 8, dtype=torch.bfloat16, device="cuda"), cw)
        assert not supports(torch.zeros(2, 8, dtype=torch.bfloat16, device="cuda"), cw)
        assert not supports(torch.zeros(1, 8, device="cuda"), cw.float())
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 8, dtype=torch.bfloat16, device=DEVICE), w.to(DEVICE))
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.zeros(1, 8, dtype=torch.bfloat16, device=DEVICE), w.to(DEVICE), torch.zeros(3, dtype=torch.bfloat16, device=DEVICE))
