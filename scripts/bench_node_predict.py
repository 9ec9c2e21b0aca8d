"""The prediction beside scripts/bench_node.py's measurement: the planner's worker profile
(`measure_profile`, workers/profile.py) of the random-weight model at each tensor-parallel size, and
the simulator (orchestrator/simulator.py) run on the same Poisson trace the benchmark sends.

A profile runs in a process of its own (this file as a script), while no server holds the GPUs:

    python scripts/bench_node_predict.py --model-dir DIR --tp 2 --device cuda --dtype bfloat16 --out p.json

`tandem profile` has no tensor-parallel flag, so the process builds `LLM(..., tensor_parallel_size=N)`
itself (rank 0 hosts the engine, so `measure_profile` runs unchanged) with `tandem worker`'s batch
limits. Only disaggregated configurations are simulated: the simulator models a context pool and a
generation pool; a configuration whose pools differ in TP takes the prefill rate from the context
pool's profile and the decode rate and batch from the generation pool's. The decode step's fixed
share (`SimParams.decode_fixed_fraction`) is fitted to the generation profile's decode steps, as
scripts/check_simulator.py does.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_node_setup import WORKER_MAX_BATCHED_TOKENS, WORKER_MAX_NUM_SEQS, NodeConfig
from check_simulator import fitted_fixed_fraction

from tandem.orchestrator.bench import poisson_gaps
from tandem.orchestrator.bench_stats import percentile
from tandem.orchestrator.sim_workload import SimRequest

Json = dict[str, Any]


def poisson_trace(num_requests: int, rate: float, seed: int, prompt_tokens: Sequence[int], output_tokens: int) -> list[SimRequest]:
    """The arrivals `tandem bench` draws for Load(num_requests, rate=rate, seed=seed) (orchestrator/
    bench.py `poisson_gaps`), each with its prompt's measured token count."""
    arrivals = itertools.accumulate(poisson_gaps(num_requests, rate, seed))
    return [SimRequest(t, prompt_tokens[i], output_tokens) for i, t in enumerate(arrivals)]


def write_trace(trace: list[SimRequest], path: Path) -> Path:
    """The trace as `tandem plan --simulate --trace` reads it."""
    path.write_text("".join(json.dumps({"t": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                                        "output_tokens": r.output_tokens}) + "\n" for r in trace))
    return path


def run_profile(model_dir: Path, tp_size: int, args: argparse.Namespace, out: Path, log: Path) -> Json:
    """Profile one worker of ``tp_size`` ranks in a child process; its JSON (profile and rows)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--model-dir", str(model_dir), "--tp", str(tp_size),
               "--device", args.device, "--dtype", args.dtype, "--prompt-tokens", str(args.prompt_tokens),
               "--output-tokens", str(args.output_tokens), "--itl-slo-ms", str(args.slo_itl_ms), "--out", str(out)]
    if args.kv_cache_bytes:
        command += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {})}  # as a Ray worker of 1 CPU
    with open(log, "wb") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=args.profile_timeout)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"profile of tp {tp_size} failed (exit {done.returncode}):\n{tail}")
    return json.loads(out.read_text())


def predict(node: NodeConfig, profiles: dict[int, Json], trace: list[SimRequest], *, kv_bytes_per_token: int,
            kv_bandwidth_gb_s: float, slo_ttft_ms: float, slo_itl_ms: float) -> Json:
    """The simulator's TTFT, ITL, throughput and goodput for ``node`` on ``trace``."""
    from tandem.orchestrator.autoscale_policy import AutoscalePolicy
    from tandem.orchestrator.planner_load import WorkerProfile
    from tandem.orchestrator.sim_cluster import SimParams
    from tandem.orchestrator.simulator import simulate

    if node.mode != "disaggregated":
        return {"skipped": "the simulator models disaggregated pools only (context + generation)"}
    context, generation = node.pools
    prefill, decode = profiles[context.tp_size]["profile"], profiles[generation.tp_size]["profile"]
    profile = WorkerProfile(prefill["prefill_tokens_per_s"], decode["decode_tokens_per_s"], decode["max_concurrent_seqs"])
    pools = {p.role: {"min_replicas": p.count, "max_replicas": p.count, "gpus_per_replica": p.tp_size} for p in node.pools}
    policy = AutoscalePolicy(pools=pools, slo={"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms}, max_gpus=node.gpus,
                             interval_s=10)
    fixed = fitted_fixed_fraction(profiles[generation.tp_size]["rows"], profile.max_concurrent_seqs)
    params = SimParams(startup_s=0.0, kv_bytes_per_token=kv_bytes_per_token, kv_bandwidth_gb_s=kv_bandwidth_gb_s,
                       decode_fixed_fraction=fixed, router_policy="kv_aware")
    result = simulate(trace, policy, profile, params)
    ttft = [r.ttft_s * 1000 for r in result.requests]
    itl = [r.mean_itl_s * 1000 for r in result.requests if r.mean_itl_s is not None]
    tokens = sum(r.output_tokens for r in result.requests)
    return {
        "ttft_ms": _percentiles(ttft), "itl_ms": _percentiles(itl),
        "output_tokens_per_s": tokens / result.end_s, "output_tokens_per_s_per_gpu": tokens / result.end_s / node.gpus,
        "goodput_req_s": sum(r.meets(policy.slo) for r in result.requests) / result.end_s,
        "profile": {"prefill_tokens_per_s": profile.prefill_tokens_per_s, "decode_tokens_per_s": profile.decode_tokens_per_s,
                    "max_concurrent_seqs": profile.max_concurrent_seqs},
        "kv_bandwidth_gb_s": kv_bandwidth_gb_s, "kv_bytes_per_token": kv_bytes_per_token, "decode_fixed_fraction": fixed,
        "itl_note": "percentiles of each request's mean inter-token gap (the simulator keeps no single gaps)",
    }


def _percentiles(values: list[float]) -> Json | None:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)} if values else None


# -- the profile process ---------------------------------------------------------------------------


def _profile_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="profile one random-weight worker of --tp ranks (bench_node.py --predict)")
    add = parser.add_argument
    add("--model-dir", required=True)
    add("--tp", type=int, default=1)
    add("--device", default="cuda")
    add("--dtype", default="bfloat16")
    add("--prompt-tokens", type=int, required=True)
    add("--output-tokens", type=int, required=True)
    add("--itl-slo-ms", type=float, required=True)
    add("--kv-cache-bytes", type=int, default=None)
    add("--out", required=True)
    args = parser.parse_args(argv)

    from tandem.workers.config import CacheConfig
    from tandem.workers.llm import LLM
    from tandem.workers.profile import measure_profile
    from tandem.workers.scheduler import SchedulerConfig

    llm = LLM(f"random:{args.model_dir}", device=args.device, dtype=args.dtype, show_progress=False,
              cache=CacheConfig(num_bytes=args.kv_cache_bytes), tensor_parallel_size=args.tp,
              scheduler=SchedulerConfig(max_num_seqs=WORKER_MAX_NUM_SEQS, max_num_batched_tokens=WORKER_MAX_BATCHED_TOKENS))
    try:
        profile, rows = measure_profile(llm, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                                        itl_slo_ms=args.itl_slo_ms, max_batch=WORKER_MAX_NUM_SEQS)
    finally:
        llm.close()
    result = {"tp_size": args.tp, "profile": profile, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_profile_main())
