"""The decode phases of scripts/bench_gpu.py: Tandem's engine against its memory roofline, and
transformers' generate on the same model shape and device.

Roofline of one decode step: every weight byte (but the input embedding table's unread rows) and
every cached K/V byte of the batch is read once, at the read rate measured in the same run (gpu_bench_common.memory_bandwidth); activations,
the new K/V writes and the logits are left out, so the roofline is a lower bound on step time.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from gpu_bench_common import Sizes, decode_read_bytes, init_random_, llama_config, summary_ms, sync, timed

from tandem.models.loader import LoadedModel, default_dtype
from tandem.models.registry import model_class_for
from tandem.models.source import ModelSource
from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine, RequestOutput
from tandem.workers.kv_cache_sizing import kv_cache_spec
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import ScheduledChunk, SchedulerConfig
from tandem.workers.sequence import FinishReason

Emit = Callable[[dict], None]
BLOCK_SIZE = 16


def build_random_model(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Tandem's model class for the config, built on the device with random weights (no checkpoint)."""
    config = llama_config(sizes)
    with torch.device(device), default_dtype(dtype):
        module = model_class_for(config)(config)
    init_random_(module)
    module.eval()
    module.prepare_for_inference()
    return LoadedModel(
        source=ModelSource(Path("random-llama"), None),
        config=config,
        model=module,
        tokenizer=None,
        eos_token_ids=frozenset(),
        max_model_len=sizes.max_positions,
    )


def engine_variants() -> list[dict]:
    """Eager, then CUDA graphs with the synchronous and with the overlapped step, as far as
    EngineConfig has the fields (the last variant is the engine's default on a GPU)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    if "enforce_eager" not in names:
        return [{}]
    if "async_scheduling" not in names:
        return [{"enforce_eager": True}, {"enforce_eager": False}]
    return [{"enforce_eager": True, "async_scheduling": False}, {"enforce_eager": False, "async_scheduling": False},
            {"enforce_eager": False, "async_scheduling": True}]


def run_tandem_decode(sizes: Sizes, device: torch.device, dtype: torch.dtype, bandwidth: dict | None, emit: Emit) -> None:
    """One engine per variant over one random model; every batch size runs in each engine."""
    loaded = build_random_model(sizes, dtype, device)
    model_bytes = decode_read_bytes(loaded.model)
    spec = kv_cache_spec(loaded.config, BLOCK_SIZE, dtype)
    kv_bytes_per_token = spec.bytes_per_block // BLOCK_SIZE  # all layers, k and v
    largest = max(sizes.batches)
    # Prefill steps of the largest batch, then warm-up and timed decodes, plus slack: no request
    # may finish before its batch's timing ends.
    max_tokens = -(-largest * sizes.prompt_len // sizes.prefill_budget) + sizes.warmup_steps + 2 * sizes.decode_steps + 4
    max_len = sizes.prompt_len + max_tokens + BLOCK_SIZE
    cache_bytes = (largest + 1) * (-(-max_len // BLOCK_SIZE)) * spec.bytes_per_block
    read_gbps = bandwidth["read_gbps"] if bandwidth else None
    for extra in engine_variants():
        config = EngineConfig(
            device=str(device), dtype=str(dtype).removeprefix("torch."), max_model_len=max_len, show_progress=False,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_bytes=cache_bytes),
            scheduler=SchedulerConfig(max_num_seqs=largest, max_num_batched_tokens=sizes.prefill_budget), **extra,
        )
        variant = {**extra, "weight_read_bytes": model_bytes, "kv_cache_bytes": cache_bytes}
        engine = None
        try:
            started = time.perf_counter()
            engine = LLMEngine(loaded, config, device)
            sync(device)
            variant.update(engine_init_s=round(time.perf_counter() - started, 2), **describe_engine(engine))
            warm_up(engine)  # JIT compiles and first-call allocations stay out of batch 1's numbers
            for batch in sizes.batches:
                try:
                    row = decode_batch(engine, batch, sizes, max_tokens, device)
                except Exception as e:  # noqa: BLE001 - report and go on with the next batch
                    emit({"phase": "decode", **variant, "batch": batch, "error": f"{type(e).__name__}: {e}"})
                    abort_all(engine)
                    continue
                emit({"phase": "decode", **variant, "batch": batch, **roofline(row, model_bytes, kv_bytes_per_token, read_gbps)})
        except Exception as e:  # noqa: BLE001
            emit({"phase": "decode", **variant, "error": f"{type(e).__name__}: {e}"})
        finally:
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def describe_engine(engine: LLMEngine) -> dict:
    """Which attention backend the engine picked, and any CUDA-graph object its runner holds."""
    runner = getattr(engine, "runner", None)
    backend = getattr(runner, "backend", None)
    kind = getattr(getattr(backend, "kind", None), "value", None)
    graphs = sorted(
        name for name, value in getattr(runner, "__dict__", {}).items()
        if value is not None and "graph" in (name + type(value).__name__).lower()
    )
    return {"backend": kind or type(backend).__name__, "runner": type(runner).__name__, "runner_graph_attrs": graphs}


def decode_batch(engine: LLMEngine, batch: int, sizes: Sizes, max_tokens: int, device: torch.device) -> dict:
    """Add ``batch`` random prompts, run their prefills, then time decode-only engine steps."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    request_ids = [f"decode-{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for rid in request_ids:
        prompt = torch.randint(0, engine.vocab_size, (sizes.prompt_len,), generator=gen).tolist()
        engine.add_request(rid, prompt, params)
    scheduler = engine.scheduler
    prefill_steps, started = 0, time.perf_counter()
    while scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in scheduler.running):
        check(engine.step(), "prefill")
        prefill_steps += 1
        if prefill_steps > 100 * batch + 100:
            raise RuntimeError("prefill did not finish")
    sync(device)
    prefill_s = time.perf_counter() - started
    for _ in range(sizes.warmup_steps):
        check(engine.step(), "warm-up decode")
    step_s, contexts = [], []
    for _ in range(sizes.decode_steps):
        running = scheduler.running
        if len(running) != batch or scheduler.waiting:
            raise RuntimeError(f"{len(running)} of {batch} sequences running at a timed step (preempted?)")
        contexts.append(sum(s.num_tokens for s in running))  # tokens each step's attention reads
        step_s.append(timed(lambda: check(engine.step(), "timed decode"), device))
    # The cadence: the same number of steps back to back, synchronized only around all of them,
    # so that an overlapped step can prepare the next one while the device runs this one.
    sync(device)
    started = time.perf_counter()
    for _ in range(sizes.decode_steps):
        check(engine.step(), "back-to-back decode")
    sync(device)
    cadence_ms = (time.perf_counter() - started) / sizes.decode_steps * 1e3
    runner = runner_times(engine, sizes.decode_steps, device)
    abort_all(engine)
    row = {
        "prompt_len": sizes.prompt_len, "prefill_steps": prefill_steps, "prefill_s": round(prefill_s, 3),
        "prefill_tok_s": round(batch * sizes.prompt_len / prefill_s, 1),
        "step": summary_ms(step_s), "cadence_ms": round(cadence_ms, 3), "runner_execute": runner,
        "mean_context_tokens": round(sum(contexts) / len(contexts) / batch, 1), "contexts": contexts,
        "tok_s": round(batch / sorted(step_s)[len(step_s) // 2], 1),
    }
    if device.type == "cuda":
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def runner_times(engine: LLMEngine, repeats: int, device: torch.device) -> dict:
    """The model alone for the current decode step (inputs, forward, logits; no scheduler or
    sampler), through the runner's execute. It recomputes the same step: same KV slots rewritten."""
    try:
        chunks = [ScheduledChunk(s, 1) for s in engine.scheduler.running]
        engine.runner.execute(chunks)
        return summary_ms([timed(lambda: engine.runner.execute(chunks), device) for _ in range(repeats)])
    except Exception as e:  # noqa: BLE001 - optional: the runner's interface may have moved
        return {"error": f"{type(e).__name__}: {e}"}


def roofline(row: dict, model_bytes: int, kv_bytes_per_token: int, read_gbps: float | None) -> dict:
    """Bytes one decode step must read, and the step's time at the measured read rate."""
    contexts = sorted(row.pop("contexts"))
    kv_bytes = contexts[len(contexts) // 2] * kv_bytes_per_token
    total = model_bytes + kv_bytes
    row.update(kv_read_bytes=kv_bytes, bytes_per_step=total)
    if read_gbps:
        roof_ms = total / (read_gbps * 1e9) * 1e3
        row.update(read_gbps=read_gbps, roofline_ms=round(roof_ms, 3),
                   pct_of_roofline=round(100 * roof_ms / row["step"]["median_ms"], 1),
                   cadence_pct_of_roofline=round(100 * roof_ms / row["cadence_ms"], 1))
        if "median_ms" in row["runner_execute"]:
            row["runner_pct_of_roofline"] = round(100 * roof_ms / row["runner_execute"]["median_ms"], 1)
    return row


def check(outputs: list[RequestOutput], stage: str) -> None:
    """The engine turns a failed forward into aborted requests and a log line: make it an error."""
    aborted = [o.request_id for o in outputs if o.finish_reason is FinishReason.ABORT]
    if aborted:
        raise RuntimeError(f"the engine aborted {len(aborted)} request(s) in a {stage} step (see the log on stderr)")
    finished = [o.request_id for o in outputs if o.finished]
    if finished and stage != "prefill":
        raise RuntimeError(f"{len(finished)} request(s) finished during the {stage} steps: max_tokens too small")


def warm_up(engine: LLMEngine) -> None:
    """One short request run to completion: a prefill and a few decodes."""
    engine.add_request(f"warm-up-{time.monotonic_ns()}", list(range(1, 2 * BLOCK_SIZE + 4)), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        check([o for o in engine.step() if o.finish_reason is FinishReason.ABORT], "warm-up")


def abort_all(engine: LLMEngine) -> None:
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_unfinished_requests():
        engine.step()


def run_hf_decode(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, bandwidth: dict | None, emit: Emit, compile_static: bool
) -> None:
    """transformers' generate at the same shape: per-step time = (N tokens - 1 token) / (N - 1)."""
    from transformers import LlamaForCausalLM

    config = llama_config(sizes)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    init_random_(model)
    model.eval()
    model_bytes = decode_read_bytes(model)
    variants = {"dynamic": {}, "static": {"cache_implementation": "static", "disable_compile": not compile_static}}
    try:
        for name, extra in variants.items():
            for batch in sizes.hf_batches:
                record = {"phase": "hf", "cache": name, "batch": batch, "weight_read_bytes": model_bytes,
                          "compiled": name == "static" and compile_static}
                try:
                    record.update(hf_steps(model, batch, sizes, device, extra))
                except Exception as e:  # noqa: BLE001 - e.g. a static cache this version lacks
                    record["error"] = f"{type(e).__name__}: {e}"
                if bandwidth and "step_ms" in record:  # KV at the mean context of the N steps
                    kv_values = batch * (sizes.prompt_len + sizes.hf_new_tokens // 2) * 2 * sizes.layers * sizes.kv_heads
                    kv_bytes = kv_values * sizes.head_dim * torch.finfo(dtype).bits // 8
                    roof_ms = (model_bytes + kv_bytes) / (bandwidth["read_gbps"] * 1e9) * 1e3
                    record.update(roofline_ms=round(roof_ms, 3), pct_of_roofline=round(100 * roof_ms / record["step_ms"], 1))
                emit(record)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def hf_steps(model, batch: int, sizes: Sizes, device: torch.device, extra: dict) -> dict:
    gen = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, sizes.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(input_ids)

    def generate(new_tokens: int) -> None:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
        if out.shape[1] != sizes.prompt_len + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - sizes.prompt_len} tokens, not {new_tokens}")

    n = sizes.hf_new_tokens
    generate(2)  # warm up (and compile, when asked)
    first = min(timed(lambda: generate(1), device) for _ in range(2))
    full = min(timed(lambda: generate(n), device) for _ in range(2))
    step = (full - first) / (n - 1)
    return {"prompt_len": sizes.prompt_len, "new_tokens": n, "prefill_s": round(first, 4),
            "generate_s": round(full, 4), "step_ms": round(step * 1e3, 3), "tok_s": round(batch / step, 1)}
