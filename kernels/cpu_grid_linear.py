"""CPU matmuls against weights kept on their quantization grid (kernels/cpu_grid_linear.c).

The embedded model ships as a Q4_1 GGUF: every projection weight, dequantized, is exactly
``code * scale + offset`` per group of 32 inputs, with 4-bit codes (8-bit for the Q8_0 embedding
that the output head shares). A decode step on a CPU is bound by streaming those weights as
float32 and by the float32 kernels' poor use of the FMA units at a few rows; the same weights as
codes stream 6 or 10 bits each and are rebuilt bit for bit in the kernel. On the 2-core Intel
VM the 121 matmuls of a batch-16 SmolLM2 step take 22.8 ms this way against 41.0 ms with oneDNN's
prepacked float32 weights (`python scripts/bench_cpu_linears.py`, docs/performance.md).

The grid is found at load (``pack_on_grid``), never assumed: a weight that any group does not
reproduce exactly (a float32 or bfloat16 checkpoint, another quantization scheme) keeps the float32
path. The result differs from a float32 matmul only by summation order, which here is input order
for every output, independent of the batch around it.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.kernels.native_build import load_native

SOURCE = Path(__file__).with_name("cpu_grid_linear.c")
ENABLE_ENV = "TANDEM_CPU_GRID_WEIGHTS"  # "0": keep every weight in float32
# Rows above this go to the float32 kernels: there every weight serves enough rows that the
# arithmetic, not the weight traffic, bounds the matmul, and oneDNN's is the faster (about 10%
# at 512 rows, even at 128 on the Intel VM).
MAX_ROWS = 128
_PANEL = 32  # output rows per packed panel and inputs per group; the C file's PANEL and GROUP
_BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class GridWeight:
    """A weight [out_features, in_features] as packed codes, scales and offsets."""

    packed: torch.Tensor  # uint8, the C file's layout
    out_features: int
    in_features: int
    bits: int


_INT, _POINTER = ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "grid_packed_bytes": (ctypes.c_size_t, [_INT, _INT, _INT]),
    "grid_pack": (ctypes.c_long, [_POINTER, _INT, _INT, _INT, _POINTER]),
    "grid_linear": (_INT, [_POINTER, _INT, _INT, _POINTER, _INT, _INT, _POINTER, _POINTER]),
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return None
    return load_native(SOURCE, _SIGNATURES)


def pack_on_grid(weight: torch.Tensor) -> GridWeight | None:
    """weight [out, in] -> its grid form with the fewest bits that reproduce it exactly; None off
    the CPU, for a dtype other than float32, for shapes not in whole groups, for a weight on no
    grid, or where the kernel could not be built."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    out_features, in_features = weight.shape
    if out_features % _PANEL or in_features % _PANEL or (library := _library()) is None:
        return None
    weight = weight.detach().contiguous()
    for bits in _BITS:
        packed = torch.empty(library.grid_packed_bytes(out_features, in_features, bits), dtype=torch.uint8)
        if library.grid_pack(weight.data_ptr(), out_features, in_features, bits, packed.data_ptr()) == -1:
            return GridWeight(packed, out_features, in_features, bits)
    return None


def grid_linear(x: torch.Tensor, weight: GridWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] float32 -> x W^T + b, [T, out] float32."""
    library = _library()
    assert library is not None, "a GridWeight exists only where the library loaded"
    if x.dim() != 2 or x.shape[1] != weight.in_features or x.dtype != torch.float32:
        raise ValueError(f"grid_linear needs float32 [T, {weight.in_features}], got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    status = library.grid_linear(
        x.data_ptr(), x.shape[0], weight.in_features, weight.packed.data_ptr(), weight.out_features,
        weight.bits, None if bias is None else bias.data_ptr(), out.data_ptr(),
    )
    if status != 0:
        raise MemoryError(f"grid_linear could not allocate {weight.in_features * _PANEL * 4} bytes of scratch")
    return out
