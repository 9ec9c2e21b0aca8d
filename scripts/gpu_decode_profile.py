"""Where a Llama-3.1-8B-shaped decode step's device time goes, to find what stands between the step
and its memory roofline at small batches. One JSON line per measurement on stdout.

    python3 scripts/gpu_decode_profile.py                  # batches 1 and 32, all parts
    python3 scripts/gpu_decode_profile.py --only attention --batches 1

Parts:
- kernels: the engine's default GPU step (CUDA graphs, overlapped step) profiled over 16 steps by
  torch.profiler; device time per kernel name per step, largest first, and their sum beside the
  step's cadence (the gap is idle device time).
- linears: every projection and the LM head at 1 and 8 rows, each layer's own weight in turn,
  captured in one CUDA graph, as GB/s of weight read against the read bandwidth measured in the
  same run; torch's linear (cuBLAS) against kernels/triton_gemv.py over its tile sizes.
- attention: the Triton paged decode kernel at 1k context, 32 calls (one per layer) in one graph,
  over split counts and tile sizes, with context buckets of 2k, 1152 (what bench_gpu's decode engine
  captures: its max_model_len) and exactly 1k.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from gpu_bench_common import Sizes, decode_read_bytes, memory_bandwidth
from gpu_bench_decode import BLOCK_SIZE, abort_all, build_random_model, check, warm_up

from tandem.kernels import triton_attention, triton_gemv
from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import SchedulerConfig


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def graph_ms(fn, calls: int, device: torch.device, replays: int = 20) -> float:
    """Milliseconds per call of ``fn`` captured ``calls`` times in one CUDA graph (median replay)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    graph.reset()
    return sorted(times)[len(times) // 2] / calls


def profile_steps(engine: LLMEngine, batch: int, sizes: Sizes, device: torch.device, steps: int = 16) -> None:
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=8 + 3 * steps, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{batch}-{i}", torch.randint(0, engine.vocab_size, (sizes.prompt_len,), generator=gen).tolist(), params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        check(engine.step(), "prefill")
    for _ in range(4):
        check(engine.step(), "warm-up")
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        check(engine.step(), "cadence")
    torch.cuda.synchronize(device)
    cadence_ms = (time.perf_counter() - started) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            check(engine.step(), "profiled")
        torch.cuda.synchronize(device)
    abort_all(engine)
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0 and event.key and not event.key.startswith("ProfilerStep"):
            rows.append((device_us / steps, event.count / steps, event.key))
    rows.sort(reverse=True)
    total_ms = sum(r[0] for r in rows) / 1e3
    emit({"part": "kernels", "batch": batch, "cadence_ms": round(cadence_ms, 3), "kernel_ms_per_step": round(total_ms, 3),
          "kernel_events": len(rows),
          "top": [{"us": round(us, 1), "calls": round(n, 1), "name": name[:120]} for us, n, name in rows[:30]]})


def linears(model: torch.nn.Module, rows: int, dtype: torch.dtype, device: torch.device, read_gbps: float) -> None:
    """Each projection over the 32 layers' own weights in turn, as in a step (one layer's o_proj
    alone would sit in L2), through torch's linear and through kernels/triton_gemv.py's tiles."""
    names = [name for name, module in model.model.layers[0].named_modules()
             if getattr(module, "weight", None) is not None and module.weight.dim() == 2]
    for name in names + ["lm_head"]:
        if name == "lm_head":
            weights = [model.lm_head.weight]
        else:
            weights = [layer.get_submodule(name).weight for layer in model.model.layers]
        x = torch.randn(rows, weights[0].shape[1], dtype=dtype, device=device)
        calls = iter(range(10**9))
        variants = {"torch": lambda w: torch.nn.functional.linear(x, w)}
        if triton_gemv.supports(x, weights[0]):
            variants["gemv"] = lambda w: triton_gemv.gemv(x, w)
            for tile in ((4, 1024, 4), (8, 512, 4), (8, 2048, 4), (8, 1024, 8), (16, 1024, 8)):
                variants[f"gemv{tile}"] = lambda w, tile=tile: triton_gemv.gemv(x, w, tile=tile)
        for variant, fn in variants.items():
            try:
                ms = graph_ms(lambda: fn(weights[next(calls) % len(weights)]), len(weights) * (1 if name == "lm_head" else 2), device)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile: report, go on
                emit({"part": "linears", "rows": rows, "name": name, "variant": variant, "error": str(e)[:200]})
                continue
            gbps = weights[0].numel() * weights[0].element_size() / (ms * 1e-3) / 1e9
            emit({"part": "linears", "rows": rows, "name": name, "variant": variant, "shape": list(weights[0].shape),
                  "us": round(ms * 1e3, 2), "gbps": round(gbps, 1), "pct_of_read_bw": round(100 * gbps / read_gbps, 1)})
        if "gemv" in variants:
            want = torch.nn.functional.linear(x.float(), weights[0].float())
            got = triton_gemv.gemv(x, weights[0]).float()
            emit({"part": "linears", "rows": rows, "name": name, "gemv_max_abs_err": (got - want).abs().max().item(),
                  "torch_max_abs_err": (torch.nn.functional.linear(x, weights[0]).float() - want).abs().max().item()})


def attention(sizes: Sizes, batch: int, dtype: torch.dtype, device: torch.device) -> None:
    context = sizes.prompt_len
    blocks_per_seq = -(-2048 // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.randn(num_blocks, 2, BLOCK_SIZE, sizes.kv_heads, sizes.head_dim, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks - 1, device=device)[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, sizes.heads, sizes.head_dim, dtype=dtype, device=device)
    kv_bytes = batch * context * 2 * sizes.kv_heads * sizes.head_dim * cache.element_size()
    default_tile = triton_attention.DOT_TILE
    try:
        for tile in ((32, 4), (64, 4), (64, 8)):
            triton_attention.DOT_TILE = tile
            for bucket in (2048, 1152, context):
                for splits in (None, 1, 2, 4, 8, 16):
                    def call() -> torch.Tensor:
                        return triton_attention.paged_decode_attention(query, cache, tables, seq_lens, 0.088, bucket, splits)
                    try:
                        us = graph_ms(call, sizes.layers, device) * 1e3
                    except Exception as e:  # noqa: BLE001 - a tile that does not compile: report, go on
                        emit({"part": "attention", "batch": batch, "tile": tile, "bucket": bucket, "splits": splits, "error": str(e)[:200]})
                        continue
                    emit({"part": "attention", "batch": batch, "tile": list(tile), "bucket": bucket, "splits": splits,
                          "default_splits": triton_attention.default_num_splits(batch, sizes.kv_heads, bucket, device),
                          "us": round(us, 2), "kv_gbps": round(kv_bytes / (us * 1e-6) / 1e9, 1)})
    finally:
        triton_attention.DOT_TILE = default_tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--only", choices=("kernels", "linears", "attention"), action="append")
    args = parser.parse_args()
    parts = args.only or ["kernels", "linears", "attention"]
    batches = [int(b) for b in args.batches.split(",")]
    device, dtype, sizes = torch.device("cuda"), torch.bfloat16, Sizes()
    bandwidth = memory_bandwidth(device, sizes.bandwidth_bytes)
    emit({"part": "bandwidth", **bandwidth, "device_name": torch.cuda.get_device_name(device)})
    if "attention" in parts:
        for batch in batches:
            attention(sizes, batch, dtype, device)
    if not {"kernels", "linears"} & set(parts):
        return
    loaded = build_random_model(sizes, dtype, device)
    emit({"part": "model", "decode_read_bytes": decode_read_bytes(loaded.model)})
    if "linears" in parts:
        for rows in (1, 8):
            linears(loaded.model, rows, dtype, device, bandwidth["read_gbps"])
    if "kernels" in parts:
        max_len = sizes.prompt_len + 96  # one context bucket above 512, as bench_gpu's decode engine has
        config = EngineConfig(
            device="cuda", dtype="bfloat16", max_model_len=max_len, show_progress=False,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_bytes=(max(batches) + 2) * 2 * 1024 * 1024 * (-(-max_len // BLOCK_SIZE))),
            scheduler=SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=sizes.prefill_budget),
        )
        engine = LLMEngine(loaded, config, device)
        warm_up(engine)
        for batch in batches:
            profile_steps(engine, batch, sizes, device)


if __name__ == "__main__":
    main()
