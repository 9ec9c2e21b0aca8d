"""CPU matmuls against weights kept on their quantization grid: the grid is found only where it
reproduces every weight bit for bit, the kernel gives the float32 matmul's result, and the
library it is built into shares torch's thread pool."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import cpu_grid_linear, native_build
from tandem.models.layers import PrepackedWeight

pytestmark = pytest.mark.skipif(cpu_grid_linear.pack_on_grid(torch.zeros(32, 32)) is None,
                                reason="the grid kernel could not be built here (no C compiler)")


def _on_grid(out_features: int, in_features: int, bits: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight made as the GGUF loader makes Q4_1 (4 bits) or Q8_0 (8 bits) ones: codes
    times a float16 scale (plus a float16 offset for 4 bits), rounded once to float32."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // 32
    scale = (torch.rand(out_features, groups, 1, generator=generator) * 0.02).half().float()
    if bits == 4:
        codes = torch.randint(0, 16, (out_features, groups, 32), generator=generator).float()
        codes[..., 0], codes[..., 1] = 0, 15  # the group's minimum and maximum, as Q4_1 makes them
        offset = (-torch.rand(out_features, groups, 1, generator=generator) * 0.1).half().float()
        weight = codes * scale + offset
    else:
        codes = torch.randint(-127, 128, (out_features, groups, 32), generator=generator).float()
        codes[..., 0] = 127  # the group's largest magnitude, as Q8_0 makes it
        weight = codes * scale
    return weight.reshape(out_features, in_features)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_on_a_grid_is_kept_with_its_bits_and_rebuilt_bit_for_bit(bits: int) -> None:
    weight = _on_grid(96, 160, bits)
    grid = cpu_grid_linear.pack_on_grid(weight)
    assert grid is not None and grid.bits == bits
    assert grid.packed.numel() * 8 < weight.numel() * (bits + 2.5)  # codes, and 2 floats a group
    # Identity rows read the weights back: each output is one product with 1.0 plus exact zeros.
    rebuilt = cpu_grid_linear.grid_linear(torch.eye(160), grid, None)
    assert torch.equal(rebuilt, weight.T)


def test_the_embedded_models_weights_are_all_on_their_grids(smollm2) -> None:
    """Q4_1 projections pack as 4 bits, the Q8_0 embedding the head shares as 8, all exactly."""
    modules = [m for m in smollm2.model.modules() if isinstance(m, PrepackedWeight)]
    assert len(modules) == 30 * 4 + 1
    bits = [m.grid_weight.bits if m.grid_weight is not None else None for m in modules]
    assert bits == [4] * 120 + [8]
    for module in (modules[0], modules[3], modules[-1]):
        rows = module.weight.shape[1]
        assert torch.equal(cpu_grid_linear.grid_linear(torch.eye(rows), module.grid_weight, None), module.weight.T)


def test_weights_on_no_grid_keep_the_float32_path() -> None:
    nudged = _on_grid(64, 64, 4)
    nudged[5, 40] = torch.nextafter(nudged[5, 40], torch.tensor(1.0))  # one weight off by one ulp
    with_nan = _on_grid(64, 64, 8)
    with_nan[0, 0] = float("nan")
    for weight in (torch.randn(64, 64), nudged, with_nan, _on_grid(64, 64, 4)[:, :48], _on_grid(64, 64, 4)[:40]):
        assert cpu_grid_linear.pack_on_grid(weight.contiguous()) is None
    assert cpu_grid_linear.pack_on_grid(_on_grid(64, 64, 4).bfloat16()) is None


def _assert_float32_sum(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within the a-priori bound of a float32 sum of K products in any order, K * eps * sum |x w|:
    loose (about 0.1% of the sum here), yet a weight read from a wrong place is off by far more."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    bound = x.shape[1] * 2.0**-24 * (F.linear(x.double().abs(), weight.double().abs()) + (0 if bias is None else bias.abs()))
    assert ((actual.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 21, 64])
def test_the_matmul_equals_float32s(bits: int, rows: int) -> None:
    weight, bias = _on_grid(224, 576, bits, seed=rows), torch.randn(224)
    grid = cpu_grid_linear.pack_on_grid(weight)
    x = torch.randn(rows, 576)
    _assert_float32_sum(cpu_grid_linear.grid_linear(x, grid, bias), x, weight, bias)
    _assert_float32_sum(cpu_grid_linear.grid_linear(x, grid, None), x, weight, None)


def test_a_row_gets_the_same_bits_in_any_batch() -> None:
    """Each output sums in input order: a sequence's logits do not depend on its batch-mates."""
    grid = cpu_grid_linear.pack_on_grid(_on_grid(128, 256, 4))
    x = torch.randn(19, 256)
    alone = torch.cat([cpu_grid_linear.grid_linear(x[i : i + 1], grid, None) for i in range(19)])
    assert torch.equal(cpu_grid_linear.grid_linear(x, grid, None), alone)


def test_a_mismatched_input_is_refused_not_read_past() -> None:
    grid = cpu_grid_linear.pack_on_grid(_on_grid(64, 96, 4))
    for x in (torch.randn(2, 64), torch.randn(2, 96).double(), torch.randn(96)):
        with pytest.raises(ValueError, match="grid_linear needs float32"):
            cpu_grid_linear.grid_linear(x, grid, None)


def test_layers_use_the_grid_up_to_its_row_limit_and_float32_kernels_above() -> None:
    from tandem.models.layers import ColumnParallelLinear, TensorParallel

    layer = ColumnParallelLinear(128, 64, bias=False, tp=TensorParallel())
    layer.weight.data.copy_(_on_grid(64, 128, 4))
    layer.prepack()
    assert layer.grid_weight is not None
    for rows in (1, cpu_grid_linear.MAX_ROWS, cpu_grid_linear.MAX_ROWS + 1):
        x = torch.randn(rows, 128)
        _assert_float32_sum(layer(x), x, layer.weight, None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_kernel_runs_on_torchs_openmp_runtime_not_a_second_one() -> None:
    """Two OpenMP runtimes would each keep a spinning thread per core: 4 busy threads on 2 cores."""
    cpu_grid_linear.grid_linear(torch.randn(4, 64), cpu_grid_linear.pack_on_grid(_on_grid(64, 64, 4)), None)
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty build cache and no loaded library; the session's library is back afterwards."""
    monkeypatch.setenv(native_build.CACHE_DIR_ENV, str(tmp_path))
    cpu_grid_linear._library.cache_clear()
    yield tmp_path / "kernels"
    monkeypatch.undo()
    cpu_grid_linear._library.cache_clear()


def test_the_library_is_built_once_per_machine_then_loaded(fresh_library: Path) -> None:
    assert cpu_grid_linear.pack_on_grid(_on_grid(32, 32, 4)) is not None
    built = list(fresh_library.glob("cpu_grid_linear-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_grid_linear._library.cache_clear()
    assert cpu_grid_linear.pack_on_grid(_on_grid(32, 32, 4)) is not None
    assert [p.stat().st_mtime_ns for p in fresh_library.glob("cpu_grid_linear-*.so")] == [stamp]


def test_a_failed_build_or_the_switch_keeps_float32_with_a_reason_in_the_log(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="tandem.kernels.native_build"):
        assert cpu_grid_linear.pack_on_grid(_on_grid(32, 32, 4)) is None
    assert "could not build cpu_grid_linear.c" in caplog.text
    monkeypatch.delenv("CC")
    cpu_grid_linear._library.cache_clear()
    monkeypatch.setenv(cpu_grid_linear.ENABLE_ENV, "0")
    assert cpu_grid_linear.pack_on_grid(_on_grid(32, 32, 4)) is None
    assert not list(fresh_library.glob("*.so"))
