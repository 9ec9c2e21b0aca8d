"""Tensor parallelism on two CUDA GPUs (NCCL): TP=2 against TP=1, then decode step time.

1. A tiny random Llama in float32: TP=2 greedy tokens must equal TP=1's (continuous batching,
   mixed prompt lengths), and the last-token logits are compared.
2. The same model in bfloat16: logits must agree within bf16 tolerance; the max abs diff is reported.
3. A mid-size random Llama (hidden 4096, 8 layers by default) in bfloat16: median decode step
   time of a batch at TP=1 and TP=2 with CUDA graphs, and at TP=2 without them.

Random models are built from a config and written as safetensors under --workdir. Every result
is one JSON object per line on stdout; the exit code is 1 if a check failed.

    python scripts/gpu_tp_check.py [--workdir DIR] [--batch 1 16] [--skip-timing]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TINY = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
)
MID = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
)
GIB = 1 << 30


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def write_random_llama(path: Path, config_fields: dict, dtype_name: str, seed: int) -> Path:
    """A Llama checkpoint with random weights (std 0.02, norms 1), made on the GPU from the
    parameter shapes of a meta-device transformers model, so no init pass runs on the host."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**config_fields, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator("cuda").manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=generator, device="cuda") * 0.02).to(dtype).cpu()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return path


def make_llm(model_dir: Path, dtype: str, tp: int, cache_bytes: int, enforce_eager: bool = False, **scheduler: int):
    from tandem.workers.config import CacheConfig
    from tandem.workers.llm import LLM
    from tandem.workers.scheduler import SchedulerConfig

    return LLM(
        str(model_dir), device="cuda", dtype=dtype, show_progress=False, tensor_parallel_size=tp,
        enforce_eager=enforce_eager, cache=CacheConfig(block_size=16, num_bytes=cache_bytes), scheduler=SchedulerConfig(**scheduler),
    )


def prompt_logits(llm, prompt: list[int]):
    """float32 logits [vocab] of the prompt's last token, in blocks borrowed from the pool."""
    from tandem.workers.sampling_params import SamplingParams
    from tandem.workers.scheduler import ScheduledChunk
    from tandem.workers.sequence import Sequence

    engine = llm.engine
    seq = Sequence("logits", tuple(prompt), SamplingParams())
    seq.block_ids = engine.pool.allocate(-(-len(prompt) // engine.pool.block_size))
    try:
        return engine.runner.execute([ScheduledChunk(seq, len(prompt))])[0].cpu()
    finally:
        engine.pool.free(seq.block_ids)


def backend_name(llm) -> str:
    runner = llm.engine.runner
    return getattr(runner, "local", runner).backend.kind.value


def prompts_for(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def check_parity(model_dir: Path, dtype: str, new_tokens: int) -> tuple[list, list]:
    """(greedy tokens, logits) at TP=1 then TP=2, over the same prompts."""
    from tandem.workers.sampling_params import SamplingParams

    prompts = prompts_for(TINY["vocab_size"], [5, 17, 40, 123, 300], seed=1)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tokens, logits = [], []
    for tp in (1, 2):
        with make_llm(model_dir, dtype, tp, GIB, max_num_batched_tokens=64, max_num_seqs=8) as llm:
            tokens.append([o.token_ids for o in llm.generate(prompts, params)])
            logits.append([prompt_logits(llm, p) for p in prompts])
            assert llm.engine.pool.num_used_blocks == 0
            emit(check=f"{dtype}_run", tp=tp, backend=backend_name(llm))
    return tokens, logits


def run_parity(workdir: Path, new_tokens: int) -> bool:
    import torch

    ok = True
    for dtype in ("float32", "bfloat16"):
        model_dir = write_random_llama(workdir / f"tiny-{dtype}", TINY, dtype, seed=0)
        tokens, logits = check_parity(model_dir, dtype, new_tokens)
        diffs = [float((a - b).abs().max()) for a, b in zip(*logits)]
        scale = max(float(t.abs().max()) for t in logits[0])
        agree = sum(x == y for a, b in zip(*tokens) for x, y in zip(a, b)) / sum(len(a) for a in tokens[0])
        if dtype == "float32":
            passed = tokens[0] == tokens[1]
            emit(check="fp32_greedy_tokens_equal", passed=passed, max_abs_logit_diff=max(diffs), max_abs_logit=scale)
        else:
            tolerance = 0.02 * max(1.0, scale)  # a few bf16 ulps of the largest logit
            passed = max(diffs) <= tolerance
            emit(check="bf16_logits_within_tolerance", passed=passed, max_abs_logit_diff=max(diffs),
                 tolerance=tolerance, max_abs_logit=scale, greedy_token_agreement=agree)
        ok &= passed
        torch.cuda.empty_cache()
    return ok


def time_decode(model_dir: Path, tp: int, batch: int, prompt_len: int, steps: int, eager: bool) -> dict:
    """Median wall time of a decode-only engine step over ``batch`` running sequences, replayed
    from CUDA graphs unless ``eager``."""
    import torch

    from tandem.workers.sampling_params import SamplingParams

    warmup = 5
    params = SamplingParams(max_tokens=warmup + steps + 2, ignore_eos=True)
    with make_llm(model_dir, "bfloat16", tp, 8 * GIB, eager, max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len) as llm:
        engine = llm.engine
        for i, prompt in enumerate(prompts_for(MID["vocab_size"], [prompt_len] * batch, seed=2)):
            engine.add_request(f"r{i}", prompt, params)
        engine.step()  # every prefill in one step
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - started)
        backend = backend_name(llm)
        for rid in list(engine.requests):
            engine.abort(rid)
        engine.step()
    median = statistics.median(times)
    return dict(check="decode_step_time", tp=tp, cuda_graphs=not eager, batch=batch, prompt_len=prompt_len, steps=steps, backend=backend,
                median_ms=round(median * 1e3, 3), p90_ms=round(sorted(times)[int(0.9 * len(times))] * 1e3, 3),
                tokens_per_s=round(batch / median, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt in the parity checks")
    parser.add_argument("--hidden", type=int, default=MID["hidden_size"], help="mid-size model hidden size")
    parser.add_argument("--layers", type=int, default=8, help="mid-size model layers")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="sequences decoding together in the timing")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()

    import torch

    if torch.cuda.device_count() < 2:
        emit(check="gpus", passed=False, error=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
        return 1
    emit(check="gpus", passed=True, torch=torch.__version__, devices=[torch.cuda.get_device_name(i) for i in range(2)],
         nccl=".".join(map(str, torch.cuda.nccl.version())))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        ok = run_parity(workdir, args.new_tokens)
        if not args.skip_timing:
            scale = args.hidden / MID["hidden_size"]
            mid = dict(MID, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       intermediate_size=int(MID["intermediate_size"] * scale) // 256 * 256)
            model_dir = write_random_llama(workdir / "mid", mid, "bfloat16", seed=3)
            for batch in args.batch:
                tp1, tp2_eager, tp2 = (time_decode(model_dir, tp, batch, args.prompt_len, args.steps, eager)
                                       for tp, eager in ((1, False), (2, True), (2, False)))
                for result in (tp1, tp2_eager, tp2):
                    emit(**result)
                emit(check="decode_speedup_tp2", batch=batch, over_tp1=round(tp1["median_ms"] / tp2["median_ms"], 3),
                     graphs_over_eager=round(tp2_eager["median_ms"] / tp2["median_ms"], 3))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
