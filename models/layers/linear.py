"""Linear layers sharded for tensor parallelism, and how full checkpoint tensors land in a shard.

Each parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``: it receives the
FULL tensor as stored in a Hugging Face checkpoint and copies this rank's slice of it into the
parameter (into the right segment of a fused weight when ``shard_id`` names one), converting dtype
on copy. Models therefore load unconverted checkpoints; fusion and sharding live here only.

Column parallel splits the output features across ranks (each rank holds a contiguous slice of
rows of the weight); row parallel splits the input features and sums partial outputs with an
all-reduce. Which rank we are and how many there are arrives as a ``TensorParallel`` value, never a
global.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tandem.kernels import cpu_grid_linear
from tandem.kernels.cpu_linear import NEVER, can_prepack, packed_linear, packed_min_rows, prepack


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in its tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid tensor parallel rank {self.rank} of size {self.size}")

    def split(self, total: int, what: str) -> int:
        """The per-rank share of ``total``; raises if it does not divide evenly."""
        if total % self.size != 0:
            raise ValueError(f"{what} ({total}) is not divisible by tensor parallel size {self.size}")
        return total // self.size


class WeightLoader(Protocol):
    def __call__(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None: ...


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` into ``dst`` (same shape), converting dtype and device."""
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: parameter slice {tuple(dst.shape)}, checkpoint {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
) -> None:
    """Loader of an unsharded parameter (norms, replicated weights): a plain copy."""
    if shard_id is not None:
        raise ValueError(f"unsharded parameter given shard {shard_id!r}")
    copy_weight(param.data, loaded_weight)


def _narrow_full(full: torch.Tensor, dim: int, tp: TensorParallel, shard_size: int) -> torch.Tensor:
    """Rank ``tp.rank``'s slice along ``dim`` of a full tensor that all ranks split evenly."""
    if full.dim() <= dim or full.shape[dim] != shard_size * tp.size:
        expected = shard_size * tp.size
        raise ValueError(f"shape mismatch: checkpoint {tuple(full.shape)}, expected {expected} along dim {dim}")
    return full.narrow(dim, tp.rank * shard_size, shard_size)


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


@functools.cache
def _triton_gemv():
    """kernels/triton_gemv.py, or None where Triton does not import."""
    try:
        from tandem.kernels import triton_gemv
    except ImportError:
        return None
    return triton_gemv


class PrepackedWeight:
    """Mixin: optional device-specific copies of `weight`, made once after loading (CPU: its
    quantization grid where it has one, and oneDNN's blocked layout), and the matmul that picks
    the fastest kernel for the call. `weight` stays the loaded, HF-shaped tensor that the
    checkpoint filled."""

    weight: nn.Parameter
    grid_weight: cpu_grid_linear.GridWeight | None = None
    packed_weight: torch.Tensor | None = None
    packed_min_rows: int = NEVER  # fewer rows than this stay on ATen, which is faster there

    def prepack(self) -> None:
        self.grid_weight = cpu_grid_linear.pack_on_grid(self.weight)
        if can_prepack(self.weight) and (min_rows := packed_min_rows(self.weight.dtype)) != NEVER:
            self.packed_weight = prepack(self.weight)
            self.packed_min_rows = min_rows

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.grid_weight is not None and x.shape[0] <= cpu_grid_linear.MAX_ROWS:
            return cpu_grid_linear.grid_linear(x, self.grid_weight, bias)
        if self.packed_weight is not None and x.shape[0] >= self.packed_min_rows:
            return packed_linear(x, self.packed_weight, bias)
        if x.is_cuda and x.shape[0] == 1 and (gemv := _triton_gemv()) is not None and gemv.supports(x, self.weight):
            return gemv.gemv(x, self.weight, bias)  # a batch-1 decode step: a pure weight stream
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(PrepackedWeight, nn.Module):
    """y = x W^T + b with W's output rows split across ranks; outputs stay sharded (no gather)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size_per_rank = tp.split(output_size, "output size")
        self.weight = _new_param(self.output_size_per_rank, input_size)  # [out / tp, in]
        self.weight.weight_loader = self.weight_loader
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = _new_param(self.output_size_per_rank)
            self.bias.weight_loader = self.weight_loader

    def _rank_slice(self, full: torch.Tensor, shard_size: int) -> torch.Tensor:
        """This rank's ``shard_size`` rows of a full [shard_size * tp, ...] checkpoint tensor."""
        return _narrow_full(full, 0, self.tp, shard_size)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        copy_weight(param.data, self._rank_slice(loaded_weight, self.output_size_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / tp]
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate/up).

    Rank r's weight is [seg_0 shard r; seg_1 shard r; ...]; ``shard_id`` is the segment index.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, tp: TensorParallel) -> None:
        self.output_sizes = tuple(output_sizes)
        super().__init__(input_size, sum(self.output_sizes), bias, tp)
        self.segment_sizes = tuple(tp.split(size, "output segment") for size in self.output_sizes)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.segment_sizes):
            raise ValueError(f"{type(self).__name__} shard must be 0..{len(self.segment_sizes) - 1}, got {shard_id!r}")
        size = self.segment_sizes[shard_id]
        offset = sum(self.segment_sizes[:shard_id])
        copy_weight(param.data.narrow(0, offset, size), self._rank_slice(loaded_weight, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; heads (query and key/value alike) are split evenly across ranks.

    Rank r's output is [q heads of r | k heads of r | v heads of r], each ``head_dim`` wide.
    Replicating key/value heads when tp > num_kv_heads is not supported.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TensorParallel
    ) -> None:
        if num_kv_heads < tp.size:
            raise ValueError(f"tensor parallel size {tp.size} exceeds num_kv_heads {num_kv_heads}")
        self.head_dim = head_dim
        self.num_heads_per_rank = tp.split(num_heads, "num_attention_heads")
        self.num_kv_heads_per_rank = tp.split(num_kv_heads, "num_key_value_heads")
        q_size = self.num_heads_per_rank * head_dim
        kv_size = self.num_kv_heads_per_rank * head_dim
        self.segments = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        super().__init__(hidden_size, (q_size + 2 * kv_size) * tp.size, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id not in self.segments:
            raise ValueError(f"{type(self).__name__} shard must be 'q', 'k' or 'v', got {shard_id!r}")
        offset, size = self.segments[shard_id]
        copy_weight(param.data.narrow(0, offset, size), self._rank_slice(loaded_weight, size))

    def split_qk_v(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, qkv] -> qk [T, heads + kv_heads, head_dim] (q heads first) and v [T, kv_heads,
        head_dim] of this rank: views, so that rotary can treat q and k as one tensor."""
        num_tokens, v_offset = qkv.shape[0], self.segments["v"][0]
        qk = qkv[:, :v_offset].view(num_tokens, -1, self.head_dim)
        v = qkv[:, v_offset:].view(num_tokens, self.num_kv_heads_per_rank, self.head_dim)
        return qk, v

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, qkv] -> q [T, heads, head_dim], k and v [T, kv_heads, head_dim] of this rank."""
        sizes = [size for _, size in self.segments.values()]
        q, k, v = qkv.split(sizes, dim=-1)
        num_tokens = qkv.shape[0]
        return (
            q.view(num_tokens, self.num_heads_per_rank, self.head_dim),
            k.view(num_tokens, self.num_kv_heads_per_rank, self.head_dim),
            v.view(num_tokens, self.num_kv_heads_per_rank, self.head_dim),
        )


class RowParallelLinear(PrepackedWeight, nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial outputs are all-reduced.

    Its input is the sharded output of a column-parallel layer. The bias is added on rank 0 only,
    before the reduction, so the sum over ranks carries it exactly once.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = tp.split(input_size, "input size")
        self.weight = _new_param(output_size, self.input_size_per_rank)  # [out, in / tp]
        self.weight.weight_loader = self.weight_loader
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = _new_param(output_size)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        copy_weight(param.data, _narrow_full(loaded_weight, 1, self.tp, self.input_size_per_rank))

    def partial_forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        """This rank's summand of the output, before the all-reduce."""
        return self.matmul(x, self.bias if self.tp.rank == 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        out = self.partial_forward(x)
        if self.tp.size > 1:
            dist.all_reduce(out)
        return out
