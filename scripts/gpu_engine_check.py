"""The engine on a GPU: the same code as on the CPU, checked token-exact against transformers.

Builds tiny random-weight Llama (llama3 rope scaling) and Qwen3 checkpoints from a config (nothing
is downloaded), saves them as safetensors, and generates greedily through `LLM(device="cuda")`
(float32: must equal transformers on the same GPU token for token; bfloat16: reported), with decode
replayed from CUDA graphs and then eagerly. Prints one JSON line per model.

    python scripts/gpu_engine_check.py            # on a machine with CUDA
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from tandem.workers import LLM, SamplingParams

TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)
CONFIGS = {
    "llama3": LlamaConfig(**TINY, architectures=["LlamaForCausalLM"], rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": Qwen3Config(**TINY, architectures=["Qwen3ForCausalLM"], head_dim=64),
}
PROMPTS = [[5, 17, 42, 7], list(range(3, 90)), [100], list(range(200, 231))]
NEW_TOKENS = 24


def check(name: str, config, directory: str) -> dict:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf.save_pretrained(directory)
    hf = hf.to("cuda")
    expected = []
    for prompt in PROMPTS:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    result = {"model": name, "device": torch.cuda.get_device_name()}
    for dtype in ("float32", "bfloat16"):
        for mode, eager in (("", False), ("eager_", True)):  # decode from CUDA graphs, then without
            llm = LLM(model=directory, device="cuda", dtype=dtype, show_progress=False, enforce_eager=eager)
            result[f"{mode}backend"] = llm.engine.runner.backend.kind.value
            result[f"{mode}graphs"] = llm.engine.runner.graphs is not None
            start = time.perf_counter()
            outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
            result[f"{mode}{dtype}_seconds"] = round(time.perf_counter() - start, 3)
            same = sum(o.token_ids == e for o, e in zip(outputs, expected))
            result[f"{mode}{dtype}_prompts_identical"] = f"{same}/{len(PROMPTS)}"
            result[f"{mode}{dtype}_blocks_leaked"] = llm.engine.pool.num_used_blocks
            del llm, outputs
            torch.cuda.empty_cache()
    return result


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    ok = True
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as directory:
            result = check(name, config, directory)
        print(json.dumps(result), flush=True)
        for mode in ("", "eager_"):
            ok &= result[f"{mode}float32_prompts_identical"] == f"{len(PROMPTS)}/{len(PROMPTS)}"
            ok &= result[f"{mode}float32_blocks_leaked"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
