"""Linear layers on the CPU through oneDNN, with each weight reordered ("prepacked") once at load,
and the row count from which that beats ATen's own matmul on this CPU.

Decode on a CPU is a stream of skinny matmuls ([batch, hidden] x [hidden, out]). ATen's default
path re-reads the weight in its stored layout on every call; oneDNN's blocked layout reached about
twice its speed at 16 rows on the 2-core CI machines (0.20 ms against 0.40 ms for a [16, 576] x
[576, 1536] fp32 matmul on an AMD EPYC VM). Where the two cross depends on the CPU: on an Intel
Xeon VM ATen won at one row (a batch-1 decode step 30 ms against 35 ms) and lost at 16 (63 against
73 ms). So the crossover is measured once per process and dtype (`packed_min_rows`) and every
matmul below it stays on ATen. The packed result differs from ATen's only by summation order
(about 1e-5 relative in fp32).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Set to a row count to skip the measurement (benchmarks, tests); 0 packs every matmul.
MIN_ROWS_ENV = "TANDEM_CPU_PACKED_MIN_ROWS"
NEVER = sys.maxsize
_CANDIDATE_ROWS = (1, 2, 4, 8, 16, 32, 64)
# A small model's MLP projection: larger than a core's L2, as decode weights are.
_PROBE_OUT, _PROBE_IN = 2816, 1024


def can_prepack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> an opaque oneDNN tensor for packed_linear. A copy: later writes to
    weight are not seen."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] -> x W^T + b, [T, out]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@functools.cache
def packed_min_rows(dtype: torch.dtype) -> int:
    """The fewest input rows at which the packed matmul is faster than ATen's on this CPU, or
    NEVER. Measured once (about 30 ms) on a probe weight rather than per layer: on the Intel VM the
    faster path was the same for every SmolLM2 projection shape at one row and at 16, so per-shape
    timings would add noise to the choice, not accuracy."""
    override = os.environ.get(MIN_ROWS_ENV)
    if override is not None:
        return int(override)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(_PROBE_OUT, _PROBE_IN, generator=generator).to(dtype)
    packed = prepack(weight)
    for rows in _CANDIDATE_ROWS:
        x = torch.randn(rows, _PROBE_IN, generator=generator).to(dtype)
        packed_s = _best_of(lambda: packed_linear(x, packed, None))
        aten_s = _best_of(lambda: F.linear(x, weight))
        if packed_s < aten_s:
            logger.info("CPU %s matmuls: oneDNN prepacked weights from %d rows, ATen below (measured)", dtype, rows)
            return rows
    logger.info("CPU %s matmuls: ATen at every size measured; weights are not prepacked", dtype)
    return NEVER


def _best_of(call: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of a few timed calls after one warm-up: the least disturbed by other work."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best
