"""The matmuls of one decode step on the CPU, alone: how long they take against how long they
would take with their weights already in cache, on the engine's grid kernel (weights as their
GGUF's 4- and 8-bit codes, kernels/cpu_grid_linear.py), on oneDNN's prepacked path, on ATen's,
and on MKL's packed sgemm (a peer the engine cannot use: its packing is made for one row count).

A decode step runs every linear of the model once (four a layer, then the lm_head). This replays
exactly those matmuls, with the model's own weights and a random [batch, in] input each, in the
model's order ("step": every weight streamed from memory, as in serving), and the first layer's
four matmuls repeated once per layer ("cached": the same flops over a few MB that stay in cache).
The gap between the two is what streaming the weights costs beyond the arithmetic; "ceiling" is
the larger of the step's flops at the fp32 matmul peak and its weight bytes (those the path
reads: float32, or the grid's codes, scales and offsets) at the read rate, both measured in the
same run.

    python scripts/bench_cpu_linears.py                  # batches 1 and 16, the embedded model
    python scripts/bench_cpu_linears.py --batches 1 4 16 64
"""
from __future__ import annotations

import argparse
import functools
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpu_bench_common import memory_bandwidth

from tandem.kernels.cpu_grid_linear import grid_linear
from tandem.kernels.cpu_linear import packed_linear, packed_min_rows
from tandem.models.layers.linear import PrepackedWeight
from tandem.models.loader import load_model

Matmul = Callable[[torch.Tensor], torch.Tensor]
PATHS = ("grid codes", "oneDNN prepacked", "ATen", "MKL packed for this batch")


def step_matmuls(model: torch.nn.Module, path: str, batch: int) -> list[tuple[int, int, Matmul]]:
    """(in, out, matmul) for every linear in forward order; the lm_head comes last in modules().
    MKL's packing is made for one row count (here: exactly `batch`), so the engine cannot use it
    for a batch that changes every step; it is here as a peer."""
    matmuls = []
    for module in model.modules():
        if not isinstance(module, PrepackedWeight):
            continue
        out_features, in_features = module.weight.shape
        dense = module.weight
        if path == "grid codes":
            matmul = functools.partial(grid_linear, weight=module.grid_weight, bias=None)
        elif path == "oneDNN prepacked":
            matmul = functools.partial(packed_linear, packed=module.packed_weight, bias=None)
        elif path == "MKL packed for this batch":
            mkl = torch.ops.mkl._mkl_reorder_linear_weight(dense, batch)
            matmul = lambda x, mkl=mkl, dense=dense: torch.ops.mkl._mkl_linear(x, mkl, dense, None, batch)  # noqa: E731
        else:
            matmul = functools.partial(F.linear, weight=dense)
        matmuls.append((in_features, out_features, matmul))
    return matmuls


def time_pass(matmuls: list[tuple[int, int, Matmul]], batch: int, repeats: int) -> float:
    """Median seconds of one pass over `matmuls`, each on a random [batch, in] input."""
    inputs = {k: torch.randn(batch, k) for k in {in_features for in_features, _, _ in matmuls}}

    def one_pass() -> None:
        for in_features, _, matmul in matmuls:
            matmul(inputs[in_features])

    return _median_seconds(one_pass, repeats, warmups=2)


def ceilings() -> tuple[float, float]:
    """(fp32 matmul GFLOP/s on a 2048 x 2048 square, GB/s reading 512 MB of fp32 with the GPU
    bench's probe): what this CPU can do at best, measured in the same run as the step."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul_s = _median_seconds(lambda: torch.mm(a, b), 10)
    read = memory_bandwidth(torch.device("cpu"), 512 * 1024 * 1024, repeats=5, dtype=torch.float32)
    return 2 * 2048**3 / matmul_s / 1e9, read["read_gbps"]


def _median_seconds(call: Callable[[], object], repeats: int, warmups: int = 1) -> float:
    for _ in range(warmups):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"), show_progress=False)
    model = loaded.model
    layers = model.config.num_hidden_layers
    linears = [m for m in model.modules() if isinstance(m, PrepackedWeight)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    grid_bytes = sum(m.grid_weight.packed.numel() for m in linears if m.grid_weight is not None)
    print(f"model {loaded.source.name}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {weight_bytes / 1e6:.0f} MB of matmul weights "
          f"({grid_bytes / 1e6:.0f} MB on their grids); "
          f"the engine packs from {packed_min_rows(torch.float32)} rows")
    peak_gflops, read_gbs = ceilings()
    print(f"ceilings: fp32 matmul {peak_gflops:.0f} GFLOP/s (2048 x 2048), "
          f"read {read_gbs:.1f} GB/s (512 MB, the faster of sum and max)")
    print("| batch | path | step ms | cached ms | step GFLOP/s | step GB/s read | ceiling ms |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            for name in PATHS:
                if name == "oneDNN prepacked" and any(m.packed_weight is None for m in linears):
                    continue
                if name == "grid codes" and any(m.grid_weight is None for m in linears):
                    continue
                if name == "MKL packed for this batch" and not torch.backends.mkl.is_available():
                    continue
                matmuls = step_matmuls(model, name, batch)
                per_layer = (len(matmuls) - 1) // layers
                cached = matmuls[:per_layer] * layers + matmuls[-1:]
                step_s, cached_s = time_pass(matmuls, batch, args.repeats), time_pass(cached, batch, args.repeats)
                flops = sum(2 * batch * k * n for k, n, _ in matmuls)
                read_bytes = grid_bytes if name == "grid codes" else weight_bytes
                ceiling_s = max(flops / (peak_gflops * 1e9), read_bytes / (read_gbs * 1e9))
                print(f"| {batch} | {name} | {step_s * 1e3:.1f} | {cached_s * 1e3:.1f} | {flops / step_s / 1e9:.0f} | "
                      f"{read_bytes / step_s / 1e9:.1f} | {ceiling_s * 1e3:.1f} |")


if __name__ == "__main__":
    main()
