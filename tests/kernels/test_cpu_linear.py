"""CPU matmuls: the oneDNN-prepacked path against ATen's, and the measured row count that picks
between them."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import cpu_linear
from tandem.models.layers import ColumnParallelLinear, RowParallelLinear, TensorParallel
from tandem.models.layers import linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def min_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sets (or measures) the crossover afresh and leaves no cached answer behind."""
    cpu_linear.packed_min_rows.cache_clear()
    yield
    monkeypatch.undo()
    cpu_linear.packed_min_rows.cache_clear()


def _layers() -> tuple[ColumnParallelLinear, RowParallelLinear]:
    torch.manual_seed(0)
    column = ColumnParallelLinear(48, 80, bias=True, tp=TensorParallel())
    row = RowParallelLinear(80, 48, bias=True, tp=TensorParallel())
    for module in (column, row):
        module.weight.data.normal_()
        module.bias.data.normal_()
    return column, row


def test_prepacked_weights_give_the_dense_result(min_rows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.MIN_ROWS_ENV, "0")
    column, row = _layers()
    x = torch.randn(5, 48)
    dense = row(column(x))
    column.prepack()
    row.prepack()
    assert column.packed_weight is not None and row.packed_weight is not None
    torch.testing.assert_close(row(column(x)), dense, atol=1e-4, rtol=1e-5)


def test_inputs_below_the_crossover_stay_on_aten(min_rows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.MIN_ROWS_ENV, "4")
    packed_calls: list[int] = []

    def counting_packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed_calls.append(x.shape[0])
        return cpu_linear.packed_linear(x, packed, bias)

    monkeypatch.setattr(linear, "packed_linear", counting_packed_linear)
    column, _ = _layers()
    column.prepack()
    assert column.packed_min_rows == 4
    small, large = torch.randn(3, 48), torch.randn(4, 48)
    assert torch.equal(column(small), F.linear(small, column.weight, column.bias))  # ATen, bit for bit
    assert packed_calls == []
    torch.testing.assert_close(column(large), F.linear(large, column.weight, column.bias), atol=1e-4, rtol=1e-5)
    assert packed_calls == [4]


def test_the_measured_crossover_is_a_probed_row_count_or_never(min_rows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_linear.MIN_ROWS_ENV, raising=False)
    measured = cpu_linear.packed_min_rows(torch.float32)
    assert measured in (*cpu_linear._CANDIDATE_ROWS, cpu_linear.NEVER)
    column, _ = _layers()
    column.prepack()
    assert (column.packed_weight is None) == (measured == cpu_linear.NEVER)
