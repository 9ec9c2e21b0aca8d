"""Our rotary embedding against transformers' LlamaRotaryEmbedding and apply_rotary_pos_emb."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tandem.models.errors import ModelLoadError
from tandem.models.layers import RopeSpec, RotaryEmbedding, rope_spec_from_config
from tandem.models.layers.fused import rotary_qk

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": LLAMA3_ROPE,
}


def llama_config(rope_parameters: dict[str, float | str]) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,  # head_dim 128, as in Llama 3
        num_key_value_heads=1,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_parameters),
    )


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers(rope: str, dtype: torch.dtype) -> None:
    config = llama_config(ROPES[rope])
    positions = torch.tensor([0, 1, 7, 100, 8191, 8192, 40000, 131071])
    hf_rotary = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(128, rope_spec_from_config(config))
    torch.testing.assert_close(ours.inv_freq, hf_rotary.inv_freq, atol=0, rtol=0)
    x = torch.randn(len(positions), 3, 128).to(dtype)
    hf_cos, hf_sin = hf_rotary(x, positions[None])  # [1, T, head_dim]
    tables = ours(positions, dtype)
    torch.testing.assert_close(tables.cos, hf_cos[0], atol=0, rtol=0)
    torch.testing.assert_close(tables.sin, hf_sin[0], atol=0, rtol=0)
    # q and k as the fused projection leaves them: one [T, heads + kv_heads, head_dim] view
    qkv = torch.randn(len(positions), (4 + 2 + 2) * 128).to(dtype)
    qk = qkv[:, : 6 * 128].view(len(positions), 6, 128)
    q, k = qk[:, :4], qk[:, 4:]
    # HF layout [batch, heads, T, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    ours_q, ours_k = rotary_qk(qk, 4, tables)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), atol=0, rtol=0)


def test_reads_legacy_rope_scaling() -> None:
    """transformers 4 configs: rope_scaling (with "type" or "rope_type") plus a top-level rope_theta."""
    legacy = SimpleNamespace(
        rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
        rope_theta=500000.0,
        max_position_embeddings=131072,
    )
    assert rope_spec_from_config(legacy) == rope_spec_from_config(llama_config(LLAMA3_ROPE))
    linear = SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e4, max_position_embeddings=4096)
    assert rope_spec_from_config(linear) == RopeSpec("linear", 1e4, 2.0, original_max_position=4096)
    plain = SimpleNamespace(rope_scaling=None, rope_theta=1e6, max_position_embeddings=32768)
    assert rope_spec_from_config(plain) == RopeSpec("default", 1e6, original_max_position=32768)


def test_unsupported_rope_type_raises() -> None:
    config = SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=4096)
    with pytest.raises(ModelLoadError, match="yarn"):
        rope_spec_from_config(config)


def test_frequencies_survive_model_dtype_cast() -> None:
    rotary = RotaryEmbedding(64, RopeSpec()).to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32
