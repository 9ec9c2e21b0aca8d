"""`tandem profile`: one worker's capacity on this hardware, in the form the planner reads.

The planner (orchestrator/planner.py) sizes the pools from three numbers per worker: prompt
tokens a context worker prefills per second, output tokens a generation worker emits per second
while its inter-token latency stays within the SLO, and how many sequences it decodes at once.
They are measured here on the engine itself (no server): prefill on fresh prompts (no prefix-cache
hits) run one at a time, as the simulator's context worker runs them and as a real one does below
saturation (a batch of prompts per step hides the cost that each lone prompt pays), decode at doubling batch sizes until a step takes longer than the ITL
SLO or the KV cache cannot hold the batch. The JSON written holds exactly the planner's keys;
the per-batch measurements are printed beside it. ``--colocated`` measures each role while the
other runs beside it on the same host (workers/profile_neighbour.py): the profile of workers that
share cores and memory bandwidth.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

from tandem.workers.llm import LLM
from tandem.workers.profile_neighbour import Neighbour
from tandem.workers.sampling_params import SamplingParams

PREFILL_PROMPTS = 8
DECODE_PROMPT_TOKENS = 16
TIMED_DECODE_STEPS = 8


def measure_profile(
    llm: LLM, *, prompt_tokens: int, output_tokens: int, itl_slo_ms: float, max_batch: int, seed: int = 0,
    neighbour: Neighbour | None = None,
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """(the planner's WorkerProfile mapping, one row per measurement); with a ``neighbour``,
    prefills are timed while it decodes and decode steps while it prefills."""
    rng = random.Random(seed)
    engine = llm.engine
    prompts = lambda count, length: [[rng.randrange(1, engine.vocab_size) for _ in range(length)] for _ in range(count)]  # noqa: E731
    _run(engine, prompts(1, DECODE_PROMPT_TOKENS), 2)  # warm-up: allocators, kernels
    if neighbour is not None:
        neighbour.switch("decode")
    lone_prompts = prompts(PREFILL_PROMPTS, prompt_tokens)
    started = time.perf_counter()
    for prompt in lone_prompts:
        _run(engine, [prompt], 1)
    prefill_tokens_per_s = PREFILL_PROMPTS * prompt_tokens / (time.perf_counter() - started)
    rows: list[dict[str, Any]] = [{"measure": "prefill", "prompts": PREFILL_PROMPTS, "one_at_a_time": True,
                                   "prompt_tokens": prompt_tokens, "tokens_per_s": round(prefill_tokens_per_s, 1)}]
    fits = engine.pool.num_blocks // -(-(prompt_tokens + output_tokens) // engine.pool.block_size)
    best = None
    batch = 1
    if neighbour is not None:
        neighbour.switch("prefill")
    while batch <= min(max_batch, fits):
        step_s = _decode_step_seconds(engine, prompts(batch, DECODE_PROMPT_TOKENS))
        rows.append({"measure": "decode", "batch": batch, "step_ms": round(step_s * 1000, 3),
                     "tokens_per_s": round(batch / step_s, 1)})
        if step_s * 1000 > itl_slo_ms:
            break
        best = (batch, batch / step_s)
        batch *= 2
    if neighbour is not None:
        neighbour.switch("idle")
    if best is None:
        raise ValueError(f"one sequence already decodes slower than the ITL SLO of {itl_slo_ms:g} ms ({rows[-1]['step_ms']} ms)")
    profile = {"prefill_tokens_per_s": round(prefill_tokens_per_s, 1), "decode_tokens_per_s": round(best[1], 1),
               "max_concurrent_seqs": best[0]}
    return profile, rows


def _run(engine, prompts: list[list[int]], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{time.monotonic_ns()}-{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()


def _decode_step_seconds(engine, prompts: list[list[int]]) -> float:
    """Median time of a step in which every sequence of the batch decodes."""
    params = SamplingParams(max_tokens=TIMED_DECODE_STEPS + 2, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{time.monotonic_ns()}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        decoding = not engine.scheduler.waiting and all(s.num_uncomputed_tokens <= 1 for s in engine.scheduler.running)
        started = time.perf_counter()
        engine.step()
        if decoding and len(engine.scheduler.running) == len(prompts):
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    from tandem.workers.config import CacheConfig
    from tandem.workers.scheduler import SchedulerConfig

    import torch

    neighbour = None
    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype, show_progress=False,
                  cache=CacheConfig(num_bytes=args.kv_cache_bytes),
                  scheduler=SchedulerConfig(max_num_seqs=args.max_batch, max_num_batched_tokens=max(2048, args.prompt_tokens)))
        if args.colocated:  # two workers share the host: each gets half its threads (oversubscribed OpenMP crawls)
            threads = max(1, torch.get_num_threads() // 2)
            torch.set_num_threads(threads)
            neighbour = Neighbour(args.model, args.device, args.dtype, args.kv_cache_bytes, threads)
        profile, rows = measure_profile(llm, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                                        itl_slo_ms=args.itl_slo_ms, max_batch=args.max_batch, neighbour=neighbour)
    except (ValueError, RuntimeError) as error:  # RuntimeError: the --colocated neighbour did not start
        print(f"tandem profile: error: {error}", file=sys.stderr)
        return 2
    finally:
        if neighbour is not None:
            neighbour.close()
    for row in rows:
        print(json.dumps(row))
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(profile, out, indent=2)
    print(json.dumps({"profile": profile, "written": args.out}))
    return 0
