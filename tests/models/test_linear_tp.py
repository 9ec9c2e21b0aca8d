"""Tensor-parallel linears: TP=2 shards loaded from the full weight recombine to the TP=1 result.

Column-parallel outputs concatenate (per fused segment); row-parallel outputs sum. The all-reduce
itself is not exercised: each rank's partial output is computed alone.
"""
from __future__ import annotations

import torch

from tandem.models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallel,
)

RANKS = (TensorParallel(0, 2), TensorParallel(1, 2))
ATOL = 1e-5


def load(layer: torch.nn.Module, name: str, full: torch.Tensor, shard_id: str | int | None = None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, full, shard_id)


def test_column_parallel() -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(12, 8), torch.randn(12), torch.randn(5, 8)
    outputs = []
    for tp in (TensorParallel(), *RANKS):
        layer = ColumnParallelLinear(8, 12, bias=True, tp=tp)
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        outputs.append(layer(x))
    expected = x @ weight.T + bias
    torch.testing.assert_close(outputs[0], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(outputs[1:], dim=-1), expected, atol=ATOL, rtol=0)


def test_row_parallel() -> None:
    torch.manual_seed(1)
    weight, bias, x = torch.randn(6, 10), torch.randn(6), torch.randn(5, 10)
    full = RowParallelLinear(10, 6, bias=True, tp=TensorParallel())
    load(full, "weight", weight)
    load(full, "bias", bias)
    partial_sum = torch.zeros(5, 6)
    for tp, x_shard in zip(RANKS, x.chunk(2, dim=-1)):
        layer = RowParallelLinear(10, 6, bias=True, tp=tp)
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        partial_sum += layer.partial_forward(x_shard)  # bias on rank 0 only, so the sum carries it once
    expected = x @ weight.T + bias
    torch.testing.assert_close(full(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(partial_sum, expected, atol=ATOL, rtol=0)


def test_qkv_parallel_with_gqa() -> None:
    torch.manual_seed(2)
    hidden, head_dim, num_heads, num_kv_heads = 16, 4, 8, 2
    wq, wk, wv = (torch.randn(n * head_dim, hidden) for n in (num_heads, num_kv_heads, num_kv_heads))
    bq, bk, bv = (torch.randn(n * head_dim) for n in (num_heads, num_kv_heads, num_kv_heads))
    x = torch.randn(3, hidden)
    per_rank: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for tp in (TensorParallel(), *RANKS):
        layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=True, tp=tp)
        for shard_id, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            load(layer, "weight", w, shard_id)
            load(layer, "bias", b, shard_id)
        q, k, v = layer.split_qkv(layer(x))
        assert q.shape[1] == num_heads // tp.size and k.shape[1] == num_kv_heads // tp.size
        per_rank.append((q.flatten(1), k.flatten(1), v.flatten(1)))
    for segment, (w, b) in enumerate(((wq, bq), (wk, bk), (wv, bv))):
        expected = x @ w.T + b
        torch.testing.assert_close(per_rank[0][segment], expected, atol=ATOL, rtol=0)
        sharded = torch.cat([per_rank[1][segment], per_rank[2][segment]], dim=-1)
        torch.testing.assert_close(sharded, expected, atol=ATOL, rtol=0)


def test_merged_gate_up_parallel() -> None:
    torch.manual_seed(3)
    hidden, intermediate = 8, 12
    gate, up, x = torch.randn(intermediate, hidden), torch.randn(intermediate, hidden), torch.randn(4, hidden)
    per_rank: list[tuple[torch.Tensor, torch.Tensor]] = []
    for tp in (TensorParallel(), *RANKS):
        layer = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias=False, tp=tp)
        load(layer, "weight", gate, 0)
        load(layer, "weight", up, 1)
        g, u = layer(x).chunk(2, dim=-1)
        per_rank.append((g, u))
    for segment, w in enumerate((gate, up)):
        expected = x @ w.T
        torch.testing.assert_close(per_rank[0][segment], expected, atol=ATOL, rtol=0)
        sharded = torch.cat([per_rank[1][segment], per_rank[2][segment]], dim=-1)
        torch.testing.assert_close(sharded, expected, atol=ATOL, rtol=0)


def test_weight_loader_converts_dtype_and_rejects_bad_shapes() -> None:
    layer = ColumnParallelLinear(4, 6, bias=False, tp=TensorParallel())
    load(layer, "weight", torch.ones(6, 4, dtype=torch.bfloat16))
    assert layer.weight.dtype == torch.float32 and layer.weight.eq(1).all()
    try:
        load(layer, "weight", torch.ones(5, 4))
    except ValueError as e:
        assert "shape mismatch" in str(e)
    else:
        raise AssertionError("a misshapen weight was accepted")


def test_qkv_rejects_more_ranks_than_kv_heads() -> None:
    try:
        QKVParallelLinear(16, 4, 8, 1, bias=False, tp=TensorParallel(0, 2))
    except ValueError as e:
        assert "num_kv_heads" in str(e)
    else:
        raise AssertionError("tp > num_kv_heads was accepted")

