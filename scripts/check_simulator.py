"""The simulator against reality: a real 1 context + 1 generation cluster of the embedded SmolLM2 on
this CPU, and `simulate()` given that CPU's profile, on the same Poisson trace.

In one run:
1. Profile the engine in this process (`measure_profile`, workers/profile.py) with one torch thread:
   each real worker runs with OMP_NUM_THREADS=1 and the two of them share the machine's cores.
   Colocated (the default; `--alone` turns it off): prefills are timed while a second engine
   process decodes beside them, decode steps while it prefills (workers/profile_neighbour.py), as
   the two workers of this cluster run on one host.
2. Draw a seeded Poisson trace (random token-id prompts around --prompt-tokens, --output-tokens
   each, EOS ignored) and write it as the simulator's JSONL trace.
3. Start one context and one generation worker process (float32, CPU, OMP_NUM_THREADS=1) and the
   REST app over them (bench_orchestrator.py's `--serve-app`: kv_aware, local_prefill_max_tokens 0,
   so every prompt is prefilled on the context worker), warm them up, and replay the trace open
   loop: each request is sent at its timestamp on a connection of its own, streaming.
4. Simulate the same trace: the policy pins 1 + 1 workers, startup 0, KV bytes per token of
   SmolLM2 in float32, the CPU hand-off bandwidth measured over NIXL (docs/performance.md).
   Twice: with the default decode step shape, and with `decode_fixed_fraction` fitted to the
   profile's measured decode steps.
5. Print a JSON summary: mean TTFT and output throughput (output tokens / (last finish - first
   arrival)), real against simulated, and whether each is within --tolerance.

Every process it starts is stopped at the end (their logs stay in the directory printed on stderr).

    python scripts/check_simulator.py --out check_simulator.json
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench_processes import Processes, run_and_report
from bench_orchestrator_clients import SSEConnection, StreamRecord

from tandem.orchestrator.autoscale_policy import AutoscalePolicy
from tandem.orchestrator.planner_load import WorkerProfile
from tandem.orchestrator.sim_cluster import SimParams
from tandem.orchestrator.sim_workload import SimRequest, load_trace
from tandem.orchestrator.simulator import SimResult, simulate

Json = dict[str, Any]
BENCH_ORCHESTRATOR = Path(__file__).resolve().parent / "bench_orchestrator.py"
CPU_KV_BANDWIDTH_GB_S = 8.0  # NIXL READ on this VM class, docs/performance.md
BLOCK_SIZE = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--requests", type=int, default=48)
    add("--rate", type=float, default=0.8, help="Poisson arrivals, requests/s")
    add("--prompt-tokens", type=int, default=128, help="mean prompt length; each is uniform within +-25%%")
    add("--output-tokens", type=int, default=32)
    add("--itl-slo-ms", type=float, default=500.0, help="the profile's decode batch limit")
    add("--max-batch", type=int, default=16, help="largest decode batch the profile tries")
    add("--warmup", type=int, default=2, help="sequential requests before the trace")
    add("--kv-cache-bytes", type=int, default=200 << 20, help="per worker")
    add("--tolerance", type=float, default=0.25)
    add("--seed", type=int, default=0)
    add("--out", default=None, help="also write the JSON summary here")
    add("--alone", action="store_true", help="profile with nothing beside the engine (not colocated)")
    return parser.parse_args(argv)


# -- 1. profile ----------------------------------------------------------------------------------


def profile_engine(args: argparse.Namespace) -> tuple[Json, list[Json], Json]:
    """(the profile, its rows, the SmolLM2 KV shape) measured on one thread."""
    import torch

    from tandem.workers.config import CacheConfig
    from tandem.workers.llm import LLM
    from tandem.workers.profile import measure_profile
    from tandem.workers.profile_neighbour import Neighbour
    from tandem.workers.scheduler import SchedulerConfig

    torch.set_num_threads(1)
    llm = LLM(None, device="cpu", dtype="float32", show_progress=False, cache=CacheConfig(num_bytes=args.kv_cache_bytes),
              scheduler=SchedulerConfig(max_num_seqs=args.max_batch, max_num_batched_tokens=2048))
    neighbour = None if args.alone else Neighbour(None, "cpu", "float32", args.kv_cache_bytes, num_threads=1)
    try:
        profile, rows = measure_profile(llm, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                                        itl_slo_ms=args.itl_slo_ms, max_batch=args.max_batch, seed=args.seed,
                                        neighbour=neighbour)
    finally:
        steps = neighbour.close() if neighbour is not None else {}
    if steps:
        rows.append({"measure": "neighbour_steps", **steps})
    kv = _kv_shape(llm)
    rows.append({"measure": "one_prompt_alone", "prompt_tokens": args.prompt_tokens,
                 "ms_median_of_3": round(1000 * _one_prompt_seconds(llm, args.prompt_tokens), 1)})
    del llm
    gc.collect()
    return profile, rows, kv


def _one_prompt_seconds(llm, prompt_tokens: int) -> float:
    """A diagnostic beside the profile: one prompt prefilled alone (the profile batches 8)."""
    from tandem.workers.sampling_params import SamplingParams

    rng, engine, times = random.Random(1), llm.engine, []
    for i in range(3):
        engine.add_request(f"alone-{i}", [rng.randrange(1, engine.vocab_size) for _ in range(prompt_tokens)],
                           SamplingParams(max_tokens=1, ignore_eos=True))
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def _kv_shape(llm) -> Json:
    spec = llm.engine.kv_cache_spec
    return {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "kv_bytes_per_token": 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4}  # float32


def fitted_fixed_fraction(rows: list[Json], capacity: int) -> float:
    """f of sim_cluster's step(n) = T_full (f + (1 - f) n / cap), least squares over the decode rows."""
    points = [(r["batch"], r["step_ms"]) for r in rows if r["measure"] == "decode" and r["batch"] <= capacity]
    if len(points) < 2:
        return SimParams().decode_fixed_fraction
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / sum((n - mean_n) ** 2 for n, _ in points)
    fixed = max(mean_t - slope * mean_n, 0.0)
    return min(max(fixed / (fixed + slope * capacity), 0.0), 1.0)


# -- 2. trace ------------------------------------------------------------------------------------


def make_trace(args: argparse.Namespace, path: Path) -> list[tuple[float, list[int]]]:
    """(arrival, prompt ids) per request; writes the simulator's JSONL trace to `path`."""
    rng = random.Random(args.seed)
    t, spread = 0.0, args.prompt_tokens // 4
    trace = []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        length = rng.randint(args.prompt_tokens - spread, args.prompt_tokens + spread)
        trace.append((t, [rng.randrange(1000, 20000) for _ in range(length)]))
    path.write_text("".join(json.dumps({"t": round(a, 6), "prompt_tokens": len(p), "output_tokens": args.output_tokens}) + "\n"
                            for a, p in trace))
    return trace


# -- 3. the real cluster -------------------------------------------------------------------------


def worker_command(role: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "tandem.workers.main", "--role", role, "--port", "0", "--device", "cpu",
            "--dtype", "float32", "--kv-cache-bytes", str(args.kv_cache_bytes), "--block-size", str(BLOCK_SIZE)]


def start_cluster(args: argparse.Namespace, processes: Processes) -> str:
    for role in ("context", "generation"):
        processes.launch(role, worker_command(role, args))
    readies = [processes.wait_ready(role) for role in ("context", "generation")]
    workers_file = processes.log_dir / "workers.json"
    workers_file.write_text(json.dumps(readies))
    processes.launch("app", [sys.executable, str(BENCH_ORCHESTRATOR), "--serve-app", str(workers_file),
                             "--max-concurrent", "512"])
    return processes.wait_ready("app")["url"]


def body(model: str, prompt: list[int], max_tokens: int) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()


async def replay(url: str, trace: list[tuple[float, list[int]]], args: argparse.Namespace) -> Json:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
    rng = random.Random(args.seed + 1)
    for _ in range(args.warmup):  # first calls pay allocators and lazy initialisation
        await _one(url, body(model, [rng.randrange(1000, 20000) for _ in range(args.prompt_tokens)], args.output_tokens))
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5

    async def at(arrival: float, prompt: list[int]) -> tuple[float, StreamRecord]:
        await asyncio.sleep(max(t0 + arrival - loop.time(), 0.0))
        sent = time.perf_counter()
        return sent, await _one(url, body(model, prompt, args.output_tokens))

    done = await asyncio.gather(*(at(a, p) for a, p in trace))
    failed = [r for _, r in done if not r.finished(args.output_tokens)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    ttft = [r.token_times[0] - sent for sent, r in done]
    first, last = min(sent for sent, _ in done), max(r.token_times[-1] for _, r in done)
    tokens = sum(r.completion_tokens or 0 for _, r in done)
    return {"ttft_ms_mean": 1000 * sum(ttft) / len(ttft), "ttft_ms_max": 1000 * max(ttft),
            "output_tokens_per_s": tokens / (last - first), "span_s": last - first, "output_tokens": tokens,
            "ttft_ms": [round(1000 * t, 1) for t in ttft]}


async def _one(url: str, payload: bytes) -> StreamRecord:
    connection = SSEConnection(url)
    try:
        return await connection.stream("/v1/completions", payload)
    finally:
        await connection.close()


# -- 4. the simulator ----------------------------------------------------------------------------


def simulated(requests: list[SimRequest], profile: WorkerProfile, params: SimParams, itl_slo_ms: float) -> Json:
    policy = AutoscalePolicy(pools={"context": {"min_replicas": 1, "max_replicas": 1},
                                    "generation": {"min_replicas": 1, "max_replicas": 1}},
                             slo={"ttft_ms": 10_000, "itl_ms": itl_slo_ms}, max_gpus=2, interval_s=10)
    result: SimResult = simulate(requests, policy, profile, params)
    ttft = [r.ttft_s for r in result.requests]
    first, last = min(r.arrival_s for r in result.requests), max(r.done_s for r in result.requests)
    tokens = sum(r.output_tokens for r in result.requests)
    return {"ttft_ms_mean": 1000 * sum(ttft) / len(ttft), "ttft_ms_max": 1000 * max(ttft),
            "output_tokens_per_s": tokens / (last - first), "span_s": last - first, "output_tokens": tokens,
            "ttft_ms": [round(1000 * t, 1) for t in ttft]}  # arrival order, as the trace


def compare(real: Json, sim: Json, tolerance: float) -> Json:
    out = {}
    for key in ("ttft_ms_mean", "output_tokens_per_s"):
        diff = (sim[key] - real[key]) / real[key]
        out[key] = {"real": round(real[key], 2), "simulated": round(sim[key], 2), "relative_difference": round(diff, 3),
                    "within_tolerance": abs(diff) <= tolerance}
    return out


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace, processes: Processes) -> Json:
    profile_map, rows, kv = profile_engine(args)
    print(json.dumps({"profile": profile_map, "rows": rows}), file=sys.stderr, flush=True)
    trace_path = processes.log_dir / "trace.jsonl"
    trace = make_trace(args, trace_path)
    url = start_cluster(args, processes)
    real = asyncio.run(replay(url, trace, args))
    print(json.dumps({"real": real}), file=sys.stderr, flush=True)
    profile = WorkerProfile(**profile_map)
    requests = load_trace(trace_path)
    fixed = fitted_fixed_fraction(rows, profile.max_concurrent_seqs)
    base = SimParams(startup_s=0.0, kv_bytes_per_token=kv["kv_bytes_per_token"], kv_bandwidth_gb_s=CPU_KV_BANDWIDTH_GB_S,
                     router_policy="round_robin", seed=args.seed)
    sims = {"default_step_shape": (base, simulated(requests, profile, base, args.itl_slo_ms))}
    fitted = dataclasses.replace(base, decode_fixed_fraction=fixed)
    sims["fitted_step_shape"] = (fitted, simulated(requests, profile, fitted, args.itl_slo_ms))
    return {
        "trace": {"file": str(trace_path), "requests": args.requests, "rate_per_s": args.rate,
                  "prompt_tokens_mean": sum(len(p) for _, p in trace) / len(trace), "output_tokens": args.output_tokens},
        "profile": profile_map, "profile_rows": rows, "profile_threads": 1, "profile_colocated": not args.alone, "kv": kv,
        "kv_bandwidth_gb_s": CPU_KV_BANDWIDTH_GB_S, "real": real,
        "simulated": {name: {"decode_fixed_fraction": round(p.decode_fixed_fraction, 3), **s} for name, (p, s) in sims.items()},
        "comparison": {name: compare(real, s, args.tolerance) for name, (_, s) in sims.items()},
        "tolerance": args.tolerance,
    }


def main(argv: list[str] | None = None) -> int:
    return run_and_report(parse_args(argv), run, "tandem-check-simulator-", "embedded SmolLM2-135M-Instruct, float32, CPU")


if __name__ == "__main__":
    sys.exit(main())
