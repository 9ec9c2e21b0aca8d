"""The decoder-only causal LM that every supported family configures, and its checkpoint loading.

Module and parameter names are the Hugging Face checkpoint keys (``model.embed_tokens``,
``model.layers.N.self_attn.o_proj``, ``model.norm``, ``lm_head``), except for the two fused
projections, which ``load_weights`` fills from their HF parts:

    q_proj / k_proj / v_proj -> qkv_proj  shards "q", "k", "v"
    gate_proj / up_proj      -> gate_up_proj  shards 0, 1

Families differ only by ``DecoderOptions`` (biases, per-head q/k norm); head_dim, tied embeddings
and rope settings are read from the config. Tokens are flattened across sequences ([T] ids and
positions); the attention backend, metadata and KV cache arrive in a ForwardContext each step.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.kernels.interface import ForwardContext
from tandem.models.errors import ModelLoadError, WeightFileError
from tandem.models.layers.fused import add_rms_norm, rotary_qk
from tandem.models.layers import (
    Attention,
    ParallelLMHead,
    PrepackedWeight,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RotaryTables,
    RowParallelLinear,
    SwiGLUMLP,
    TensorParallel,
    VocabParallelEmbedding,
    default_weight_loader,
    rope_spec_from_config,
)

# (fused parameter module, HF checkpoint module, shard id)
_FUSED_PARTS: tuple[tuple[str, str, str | int], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
# Checkpoint keys that are not parameters and are safe to drop.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class DecoderOptions:
    """What a family changes in the shared decoder."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each q/k head before rotary (Qwen3)


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    """Projections, optional per-head q/k norm, rotary, paged attention, output projection."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, options: DecoderOptions, tp: TensorParallel) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_kv_heads, options.qkv_bias, tp)
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, options.o_bias, tp)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if options.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.attn = Attention(
            layer_idx,
            self.qkv_proj.num_heads_per_rank,
            self.qkv_proj.num_kv_heads_per_rank,
            head_dim,
            scale=head_dim**-0.5,
        )

    def forward(self, hidden: torch.Tensor, rotary: RotaryTables, ctx: ForwardContext) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        qk, v = self.qkv_proj.split_qk_v(self.qkv_proj(hidden))  # [T, heads + kv_heads | kv_heads, head_dim]
        num_heads = self.attn.num_heads
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :num_heads]), self.k_norm(qk[:, num_heads:])), dim=1)
        q, k = rotary_qk(qk, num_heads, rotary)
        out = self.attn(q, k, v, ctx)  # [T, heads, head_dim]
        return self.o_proj(out.flatten(1))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then SwiGLU MLP."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, options: DecoderOptions, tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_idx, options, tp)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, options.mlp_bias, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryTables, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the next layer (or the final
        norm) adds the two, fused with its norm, so each add costs no kernel of its own."""
        normed, residual = add_rms_norm(hidden, residual, self.input_layernorm)
        hidden = self.self_attn(normed, rotary, ctx)
        normed, residual = add_rms_norm(hidden, residual, self.post_attention_layernorm)
        return self.mlp(normed), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm: HF's ``model.`` prefix."""

    def __init__(self, config: PretrainedConfig, options: DecoderOptions, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, layer_idx, options, tp) for layer_idx in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), rope_spec_from_config(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        rotary = self.rotary_emb(positions, hidden.dtype)  # cos and sin, [T, head_dim] each
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rotary, ctx)
        return add_rms_norm(hidden, residual, self.norm)[0]


class DecoderForCausalLM(nn.Module):
    """The interface the model runner calls: forward, compute_logits, load_weights."""

    def __init__(self, config: PretrainedConfig, tp: TensorParallel, options: DecoderOptions) -> None:
        super().__init__()
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ModelLoadError(f"hidden_act {hidden_act!r} is not supported (only silu)")
        self.config = config
        self.tp = tp
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.model = DecoderModel(config, options, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return self.lm_head.compute_logits(hidden)

    def prepare_for_inference(self) -> None:
        """Once the weights are loaded: give every matmul its device-specific weight layout."""
        for module in self.modules():
            if isinstance(module, PrepackedWeight):
                module.prepack()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF checkpoint tensors by name; raises WeightFileError on an unknown, misshapen
        or missing tensor, naming it."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            param_name, shard_id = _to_param_name(name)
            param = params.get(param_name)
            if param is None:
                raise WeightFileError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard_id)
            except ValueError as e:
                raise WeightFileError(f"cannot load checkpoint tensor {name!r}: {e}") from e
            loaded.add(name)
        missing = sorted(_checkpoint_names(params) - loaded)
        if missing:
            raise WeightFileError(f"checkpoint lacks {len(missing)} tensor(s) {type(self).__name__} needs: {missing}")


def _to_param_name(checkpoint_name: str) -> tuple[str, str | int | None]:
    """HF key -> (our parameter name, shard id within a fused parameter or None)."""
    for fused, part, shard_id in _FUSED_PARTS:
        marker = f".{part}."
        if marker in checkpoint_name:
            return checkpoint_name.replace(marker, f".{fused}.", 1), shard_id
    return checkpoint_name, None


def _checkpoint_names(params: dict[str, nn.Parameter]) -> set[str]:
    """The HF keys that together fill ``params`` (fused parameters expand to their parts)."""
    names: set[str] = set()
    for name in params:
        parts = [name.replace(f".{fused}.", f".{part}.", 1) for fused, part, _ in _FUSED_PARTS if f".{fused}." in name]
        names.update(parts or [name])
    return names
