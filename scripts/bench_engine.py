"""Offline throughput and per-step latency of the Tandem engine against transformers `generate`.

Both run the same model (default: the embedded SmolLM2-135M-Instruct GGUF, float32), the same
prompts and the same number of new tokens (EOS ignored), greedily, in the same process, one after
the other. For each batch size it reports prompt and generated tokens per second and the median
decode step time (Tandem: measured per engine step; transformers: generation time / new tokens).

    python scripts/bench_engine.py                    # batches 1, 16, 64; 64 new tokens
    python scripts/bench_engine.py --batches 16 --new-tokens 32 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from tandem.models.source import resolve_model
from tandem.workers import LLM, SamplingParams

TOPICS = [
    "the history of the printing press", "how a refrigerator works", "the water cycle", "the rules of chess",
    "why the sky is blue", "how vaccines train the immune system", "the life of honey bees", "how a compiler works",
    "the causes of the French Revolution", "photosynthesis in plants", "how airplanes stay in the air",
    "the structure of an atom", "the invention of the telephone", "how volcanoes form", "the game of cricket",
    "how the internet routes packets",
]


def make_prompts(count: int) -> list[str]:
    """Prompts of varied length (about 15 to 90 tokens), deterministic."""
    prompts = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        detail = " Please be thorough and give examples." * (i % 5)
        prompts.append(f"Write a short explanation of {topic} for a curious student.{detail} Begin:")
    return prompts


def bench_tandem(llm: LLM, prompts: list[str], new_tokens: int) -> dict:
    """Starts from an empty prefix cache: blocks cached by an earlier run (the warm-up's prompts,
    a smaller batch's) would spare prefill work transformers has to do. Prefixes shared within
    the batch still hit, as they would in serving."""
    engine = llm.engine
    if not engine.pool.reset_prefix_cache():
        raise RuntimeError("blocks still in use before a benchmark run")
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    step_times, decode_times, outputs = [], [], []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        plan_had_prefill = bool(engine.scheduler.waiting) or any(
            s.num_uncomputed_tokens > 1 for s in engine.scheduler.running
        )
        outputs.extend(engine.step())
        elapsed = time.perf_counter() - t0
        step_times.append(elapsed)
        if not plan_had_prefill:
            decode_times.append(elapsed)
    total = time.perf_counter() - start
    prompt_tokens = sum(o.num_prompt_tokens for o in outputs if o.finished)
    generated = sum(o.num_output_tokens for o in outputs if o.finished)
    return _row(total, prompt_tokens, generated, statistics.median(decode_times or step_times))


def bench_transformers(model, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    total = time.perf_counter() - start
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    prompt_tokens = int(batch["attention_mask"].sum())
    return _row(total, prompt_tokens, generated, total / new_tokens)


def _row(total: float, prompt_tokens: int, generated: int, step: float) -> dict:
    return {
        "seconds": round(total, 3),
        "prompt_tok_s": round(prompt_tokens / total, 1),
        "gen_tok_s": round(generated / total, 1),
        "step_ms": round(step * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both engines")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    llm = LLM(args.model, device="cpu", dtype=args.dtype, show_progress=False)
    source = resolve_model(args.model)
    tokenizer = llm.tokenizer
    tokenizer.padding_side = "left"
    hf_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    hf_model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=getattr(torch, args.dtype), **hf_kwargs).eval()

    warm = make_prompts(2)
    bench_tandem(llm, warm, 4)
    bench_transformers(hf_model, tokenizer, warm, 4)
    results = []
    for batch in args.batches:
        prompts = make_prompts(batch)
        tandem = bench_tandem(llm, prompts, args.new_tokens)
        hf = bench_transformers(hf_model, tokenizer, prompts, args.new_tokens)
        speedup = round(tandem["gen_tok_s"] / hf["gen_tok_s"], 2)
        results.append({"batch": batch, "tandem": tandem, "transformers": hf, "speedup": speedup})

    print(f"model {source.name}, {args.dtype}, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| batch | engine | seconds | prompt tok/s | gen tok/s | decode step ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for name in ("tandem", "transformers"):
            row = r[name]
            speed = f"{r['speedup']}x" if name == "tandem" else ""
            print(f"| {r['batch']} | {name} | {row['seconds']} | {row['prompt_tok_s']} | {row['gen_tok_s']} | {row['step_ms']} | {speed} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
