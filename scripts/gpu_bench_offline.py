"""The prefill and offline phases of scripts/bench_gpu.py.

prefill: one long prompt through Tandem's engine in one step, its FLOPs against the bf16 matmul
peak measured in the same run (median of torch.mm of two N x N matrices).
offline: a fixed set of random requests run to completion (EOS ignored), output tokens/s of
Tandem's LLMEngine, then of transformers on the same device (generate at a fixed batch with the
dynamic and the static cache, and continuous batching's generate_batch when it exists).
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from gpu_bench_common import Sizes, init_random_, llama_config, sync, timed
from gpu_bench_decode import BLOCK_SIZE, build_random_model, describe_engine, engine_variants, warm_up

from tandem.models.loader import default_dtype
from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine, RequestOutput
from tandem.workers.kv_cache_sizing import kv_cache_spec
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import SchedulerConfig
from tandem.workers.sequence import FinishReason

Emit = Callable[[dict], None]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> tuple[float, dict]:
    """Median rate of torch.mm of two n x n matrices (2 n^3 FLOPs each), after 3 warm-up calls."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b)
    seconds = statistics.median(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    tflops = 2 * n**3 / seconds / 1e12
    return tflops, {"matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_ms": round(seconds * 1e3, 3),
            "peak_tflops": round(tflops, 3)}


def prefill_flops(module: torch.nn.Module, sizes: Sizes, tokens: int) -> dict:
    """2 x non-embedding parameters x tokens, the lm_head once (logits of the last token only),
    plus causal attention: QK^T and PV, 2 FLOPs a multiply-add, half the T x T scores."""
    params = dict(module.named_parameters())
    lm_head = sum(p.numel() for name, p in params.items() if name.startswith("lm_head"))
    body = sum(p.numel() for name, p in params.items() if "embed_tokens" not in name and not name.startswith("lm_head"))
    attention = 2 * 2 * sizes.layers * sizes.heads * sizes.head_dim * tokens**2 // 2
    return {"non_embedding_params": body, "lm_head_params": lm_head,
            "flops": 2 * body * tokens + 2 * lm_head + attention, "attention_flops": attention}


def run_prefill(sizes: Sizes, device: torch.device, dtype: torch.dtype, emit: Emit) -> None:
    """Median of ``prefill_repeats`` single-prompt prefills (fresh random prompts: no prefix hits)."""
    peak_tflops, peak = matmul_peak(sizes.matmul_n, dtype, device)
    free(device)
    loaded = build_random_model(sizes, dtype, device)
    tokens = sizes.prefill_len
    spec = kv_cache_spec(loaded.config, BLOCK_SIZE, dtype)
    max_len = tokens + 2 * BLOCK_SIZE
    config = EngineConfig(
        device=str(device), dtype=str(dtype).removeprefix("torch."), max_model_len=max_len, show_progress=False,
        cache=CacheConfig(block_size=BLOCK_SIZE, num_bytes=2 * (max_len // BLOCK_SIZE + 1) * spec.bytes_per_block),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=tokens),
    )
    engine = LLMEngine(loaded, config, device)
    try:
        gen = torch.Generator().manual_seed(tokens)
        runs = [prefill_once(engine, torch.randint(0, engine.vocab_size, (tokens,), generator=gen).tolist(), device)
                for _ in range(1 + sizes.prefill_repeats)][1:]  # the first is a warm-up (JIT, autotuning)
        step_s = statistics.median(s for s, _ in runs)
        flops = prefill_flops(loaded.model, sizes, tokens)
        achieved = flops["flops"] / step_s / 1e12
        emit({"phase": "prefill", "prompt_len": tokens, "steps": max(n for _, n in runs), "repeats": len(runs),
              "step_ms": round(step_s * 1e3, 3), "runs_ms": [round(s * 1e3, 3) for s, _ in runs], **flops,
              "achieved_tflops": round(achieved, 3), **peak, "pct_of_peak": round(100 * achieved / peak_tflops, 1),
              "goal_pct_of_peak": 60, "backend": describe_engine(engine)["backend"]})
    finally:
        del engine, loaded
        free(device)


def prefill_once(engine: LLMEngine, prompt: list[int], device: torch.device) -> tuple[float, int]:
    """Seconds and engine steps from queueing ``prompt`` (max_tokens 1) to its finish."""
    engine.add_request(f"prefill-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    outputs: list[RequestOutput] = []
    sync(device)
    started = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        outputs += engine.step()
        steps += 1
    sync(device)
    seconds = time.perf_counter() - started
    check_outputs(outputs)
    if sum(o.num_cached_tokens for o in outputs if o.finished):
        raise RuntimeError("the prefill prompt hit the prefix cache")
    return seconds, steps


def check_outputs(outputs: list[RequestOutput]) -> int:
    """Output tokens of the finished requests; an aborted request is an error."""
    if any(o.finish_reason is FinishReason.ABORT for o in outputs):
        raise RuntimeError("the engine aborted a request (see the log on stderr)")
    return sum(o.num_output_tokens for o in outputs if o.finished)


def random_prompts(sizes: Sizes) -> list[list[int]]:
    gen = torch.Generator().manual_seed(sizes.offline_prompt_len)
    shape = (sizes.offline_requests, sizes.offline_prompt_len)
    return torch.randint(0, sizes.vocab, shape, generator=gen).tolist()


# Expected at default sizes on one H100 (estimates, not yet measured): Tandem ~15 s with engine
# init and graph capture; transformers ~20 s for each of dynamic, static and generate_batch over
# 128 requests (about 1,700 tok/s), ~10 s of model builds: ~90 s in all, under the 3-minute goal.
def run_offline(sizes: Sizes, device: torch.device, dtype: torch.dtype, emit: Emit) -> None:
    """Tandem first, its engine freed, then transformers' variants over the first hf requests."""
    prompts = random_prompts(sizes)
    tandem = offline_tandem(sizes, prompts, device, dtype)
    emit({"phase": "offline", "engine": "tandem", **tandem})
    free(device)
    hf = offline_hf(sizes, prompts[: sizes.offline_hf_requests], device, dtype, emit)
    best = max((r["tok_s"] for r in hf if "tok_s" in r), default=None)
    emit({"phase": "offline", "engine": "summary", "tandem_tok_s": tandem["tok_s"], "best_hf_tok_s": best,
          "best_hf": next((r["variant"] for r in hf if r.get("tok_s") == best), None),
          "ratio_to_best_hf": round(tandem["tok_s"] / best, 2) if best else None, "goal_ratio": 5})


def offline_tandem(sizes: Sizes, prompts: list[list[int]], device: torch.device, dtype: torch.dtype) -> dict:
    loaded = build_random_model(sizes, dtype, device)
    new = sizes.offline_output_len
    spec = kv_cache_spec(loaded.config, BLOCK_SIZE, dtype)
    max_len = sizes.offline_prompt_len + new + BLOCK_SIZE
    num_bytes = (len(prompts) + 1) * (-(-max_len // BLOCK_SIZE)) * spec.bytes_per_block
    graphs = engine_variants()[-1]  # the engine's default on a GPU
    config = EngineConfig(
        device=str(device), dtype=str(dtype).removeprefix("torch."), max_model_len=max_len, show_progress=False,
        cache=CacheConfig(block_size=BLOCK_SIZE, num_bytes=num_bytes),
        scheduler=SchedulerConfig(max_num_seqs=sizes.offline_max_seqs, max_num_batched_tokens=sizes.offline_batched_tokens),
        **graphs,
    )
    started = time.perf_counter()
    engine = LLMEngine(loaded, config, device)
    try:
        sync(device)
        init_s = time.perf_counter() - started
        warm_up(engine)
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        sync(device)
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(f"offline-{i}-{time.monotonic_ns()}", prompt, params)
        outputs, steps = [], 0
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
            steps += 1
        sync(device)
        seconds = time.perf_counter() - started
        tokens = check_outputs(outputs)
        if tokens != len(prompts) * new:
            raise RuntimeError(f"{tokens} output tokens, not {len(prompts)} x {new}")
        return {"requests": len(prompts), "prompt_len": sizes.offline_prompt_len, "output_len": new,
                "output_tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1), "steps": steps,
                "engine_init_s": round(init_s, 2), "max_num_seqs": sizes.offline_max_seqs,
                "max_num_batched_tokens": sizes.offline_batched_tokens, "kv_cache_bytes": num_bytes, **graphs,
                **describe_engine(engine)}
    finally:
        del engine, loaded
        free(device)


def offline_hf(sizes: Sizes, prompts: list[list[int]], device: torch.device, dtype: torch.dtype, emit: Emit) -> list[dict]:
    """Each variant's record (emitted as it ends); a failing variant is an "error" record."""
    from transformers import LlamaForCausalLM

    config = llama_config(sizes)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    init_random_(model)
    model.eval()
    records = []
    try:
        static = {"cache_implementation": "static", "disable_compile": True}
        variants = {
            "generate_dynamic": partial(hf_generate, model, prompts, sizes, device, {}),
            "generate_static": partial(hf_generate, model, prompts, sizes, device, static),
            "generate_batch": partial(hf_generate_batch, model, prompts, sizes, device),
        }
        for name, fn in variants.items():
            record = {"phase": "offline", "engine": "transformers", "variant": name, "requests": len(prompts),
                      "prompt_len": sizes.offline_prompt_len, "output_len": sizes.offline_output_len}
            try:
                record.update(fn())
            except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                record["error"] = f"{type(e).__name__}: {e}"
            emit(record)
            records.append(record)
            free(device)
    finally:
        del model
        free(device)
    return records


def hf_generate(model, prompts: list[list[int]], sizes: Sizes, device: torch.device, extra: dict) -> dict:
    """generate over the prompts in batches of ``offline_hf_batch``; a 2-token warm-up batch first."""
    new, batch = sizes.offline_output_len, sizes.offline_hf_batch

    def generate(chunk: list[list[int]], n: int) -> int:
        ids = torch.tensor(chunk, device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, not {n}")
        return ids.shape[0] * n

    generate(prompts[:batch], 2)
    sync(device)
    started = time.perf_counter()
    tokens = sum(generate(prompts[i : i + batch], new) for i in range(0, len(prompts), batch))
    sync(device)
    seconds = time.perf_counter() - started
    return {"batch": batch, "output_tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1),
            "attn_implementation": model.config._attn_implementation}


def hf_generate_batch(model, prompts: list[list[int]], sizes: Sizes, device: torch.device) -> dict:
    """Continuous batching; tok/s over the first request's creation to the last one's finish (so
    the manager's own warm-up, which runs the kernels and captures CUDA graphs before any request
    is created, is left out); the whole call, warm-up included, is ``call_s``."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    if not hasattr(model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch")
    # This transformers accepts "sdpa", "paged|eager" or flash for continuous batching (not "paged|sdpa").
    model.set_attn_implementation("sdpa")
    config = GenerationConfig(max_new_tokens=sizes.offline_output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # On a GPU the cache is sized by transformers from free memory. On a CPU it would take most of
    # the RAM and the warm-up (CUDA-graph capture) only costs time: a small cache, no warm-up.
    on_gpu = device.type == "cuda"
    cb_config = None if on_gpu else ContinuousBatchingConfig(num_blocks=2 * len(prompts), max_batch_tokens=256)
    sync(device)
    started = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cb_config,
                                   warmup=on_gpu)
    sync(device)
    call_s = time.perf_counter() - started
    outputs = list(results.values())
    errors = [o.error for o in outputs if o.error is not None]
    if errors or len(outputs) != len(prompts):
        raise RuntimeError(f"{len(outputs)} of {len(prompts)} results, {len(errors)} failed: {errors[:1]}")
    tokens = sum(len(o.generated_tokens) for o in outputs)
    if tokens != len(prompts) * sizes.offline_output_len:
        raise RuntimeError(f"{tokens} output tokens, not {len(prompts)} x {sizes.offline_output_len}")
    seconds = max(o.lifespan[1] for o in outputs) - min(o.created_time for o in outputs)
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1),
            "call_s": round(call_s, 3), "attn_implementation": model.config._attn_implementation}
