"""Shared pieces of scripts/bench_gpu.py: the sizes of a run, the Llama config, timing, and the
memory-bandwidth probe every roofline in the run is measured against."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from tandem.models.random_weights import init_random_

__all__ = [  # init_random_ lives in models/random_weights.py (the loader's random:<dir> uses it too)
    "SMOKE", "Sizes", "init_random_", "llama_config", "memory_bandwidth", "percentile", "summary_ms", "sync", "timed",
    "decode_read_bytes", "weight_bytes",
]


@dataclass(frozen=True, slots=True)
class Sizes:
    """One run's sizes. Defaults: Llama-3.1-8B's shape (random weights) and the issue's batches."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    max_positions: int = 8192
    batches: tuple[int, ...] = (1, 8, 32, 128)
    prompt_len: int = 1024
    warmup_steps: int = 3  # decode steps run before the timed ones
    decode_steps: int = 32  # timed decode steps per batch
    prefill_budget: int = 16384  # max_num_batched_tokens: 16 prompts of 1024 per prefill step
    hf_batches: tuple[int, ...] = (1, 8)
    hf_new_tokens: int = 64
    coldstart_layers: int = 8
    coldstart_vocab: int = 32000
    shard_bytes: int = 2 << 30
    bandwidth_bytes: int = 4 << 30
    prefill_len: int = 4096  # one prompt, prefilled in one engine step
    prefill_repeats: int = 3  # timed prefills (median), after one warm-up
    matmul_n: int = 8192  # the peak: torch.mm of two matmul_n x matmul_n matrices
    offline_requests: int = 256
    offline_prompt_len: int = 512
    offline_output_len: int = 256
    offline_max_seqs: int = 256
    offline_batched_tokens: int = 16384
    offline_hf_requests: int = 128  # the first this many requests run through transformers
    offline_hf_batch: int = 64


SMOKE = Sizes(
    hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1024, max_positions=1024,
    batches=(1, 2), prompt_len=64, warmup_steps=1, decode_steps=4, prefill_budget=64, hf_batches=(1, 2),
    hf_new_tokens=8, coldstart_layers=2, coldstart_vocab=1024, shard_bytes=1 << 20, bandwidth_bytes=64 << 20,
    prefill_len=64, prefill_repeats=2, matmul_n=256, offline_requests=8, offline_prompt_len=16, offline_output_len=8,
    offline_max_seqs=8, offline_batched_tokens=64, offline_hf_requests=8, offline_hf_batch=4,
)


def llama_config(sizes: Sizes, *, layers: int | None = None, vocab: int | None = None) -> LlamaConfig:
    """A Llama 3.1-style config (llama3 rope scaling, GQA, untied lm_head) at ``sizes``."""
    return LlamaConfig(
        vocab_size=vocab or sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=layers or sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.head_dim,
        max_position_embeddings=sizes.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            # Llama 3.1 scales 8192 positions by 8; here the context is max_positions, so 1/8 of it.
            "high_freq_factor": 4.0, "original_max_position_embeddings": sizes.max_positions // 8,
        },
    )


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter, a tied lm_head counted once (parameters() yields it once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_read_bytes(module: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: every parameter but an untied input embedding table, of
    which a step reads only its batch's rows (Llama-3.1-8B: 1.05 of 16.06 GB). A tied table is the
    LM head too, which reads it whole."""
    embed = next((p for n, p in module.named_parameters() if n.endswith("embed_tokens.weight")), None)
    head = next((p for n, p in module.named_parameters(remove_duplicate=False) if n.endswith("lm_head.weight")), None)
    unread = embed if embed is not None and head is not embed else None
    return sum(p.numel() * p.element_size() for p in module.parameters() if p is not unread)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> dict:
    return {
        "median_ms": round(statistics.median(seconds) * 1e3, 3),
        "p90_ms": round(percentile(seconds, 90) * 1e3, 3),
        "min_ms": round(min(seconds) * 1e3, 3),
        "n": len(seconds),
    }


def memory_bandwidth(
    device: torch.device, num_bytes: int, repeats: int = 7, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Read rate of two read-only reductions (sum, max) over ``num_bytes`` of ``dtype``, and the copy
    rate (read + write counted); medians of ``repeats``. ``read_gbps`` is the faster reduction,
    so a roofline built on it is the stricter one. (On a CPU a bfloat16 reduction is bound by its
    conversions, not by memory: pass float32 there.)"""
    x = torch.empty(num_bytes // dtype.itemsize, dtype=dtype, device=device).uniform_(-1, 1)
    y = torch.empty_like(x)
    rates = {}
    for name, fn, moved in (
        ("sum", lambda: x.sum(), num_bytes),
        ("max", lambda: x.max(), num_bytes),
        ("copy", lambda: y.copy_(x), 2 * num_bytes),
    ):
        fn()  # warm up
        seconds = [timed(fn, device) for _ in range(repeats)]
        rates[f"{name}_gbps"] = round(moved / statistics.median(seconds) / 1e9, 1)
    x = y = None  # noqa: F841 - frees both before empty_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**rates, "read_gbps": max(rates["sum_gbps"], rates["max_gbps"]), "bytes": num_bytes, "repeats": repeats}
