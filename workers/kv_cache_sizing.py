"""How big a worker's KV cache is: the geometry one rank needs, and how many blocks fit the budget
(bytes, a fraction of device memory, or the device's default)."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tandem.kvtransfer.kv_cache import KVCacheSpec, num_blocks_for_budget
from tandem.models.decoder import head_dim_of
from tandem.models.layers import TensorParallel
from tandem.workers.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_GPU_KV_CACHE_FRACTION, EngineConfig


def kv_cache_spec(hf: PretrainedConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> KVCacheSpec:
    """The KV cache geometry one rank needs: one (key, value) pair per layer and per kv head of
    this rank's share. Raises ValueError when the kv heads do not divide by ``tp_size``."""
    head_dim = head_dim_of(hf)
    num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    per_rank = TensorParallel(0, tp_size).split(num_kv_heads, "num_key_value_heads")
    return KVCacheSpec(hf.num_hidden_layers, per_rank, head_dim, block_size, dtype)


def num_kv_cache_blocks(spec: KVCacheSpec, config: EngineConfig, device: torch.device) -> int:
    cache = config.cache
    if cache.num_bytes is None and cache.memory_fraction is None:
        if device.type == "cuda":
            # Of the memory still free once the weights are in, so that other engines or
            # processes sharing the GPU keep what they hold.
            free_bytes, _ = torch.cuda.mem_get_info(device)
            return num_blocks_for_budget(spec, num_bytes=int(free_bytes * DEFAULT_GPU_KV_CACHE_FRACTION), device=device)
        return num_blocks_for_budget(spec, num_bytes=DEFAULT_CPU_KV_CACHE_BYTES, device=device)
    return num_blocks_for_budget(spec, num_bytes=cache.num_bytes, memory_fraction=cache.memory_fraction, device=device)


def context_length(config: EngineConfig, model_max_len: int, num_blocks: int, block_size: int) -> int:
    """The longest sequence an engine serves: the configured (else the model's) context, capped by
    what its KV cache holds. Every tensor-parallel rank derives it alike, so their decode graphs
    have the same shapes."""
    return min(config.max_model_len or model_max_len, num_blocks * block_size)
