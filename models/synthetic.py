"""A weightless stand-in model, ``--model synthetic``: the real model interface with no compute.

It lets the whole worker engine (scheduler, paged KV blocks, leases, NIXL transfers, streaming)
and the orchestrator run at full speed, so that what they cost can be measured on their own.
Config and tokenizer are the embedded SmolLM2's (models/source.py), with the KV geometry shrunk
to one layer, one KV head and head_dim 8 (1 KiB a 16-token block in float32).

Each step stores the token id itself as every key and value element of every layer through
``ctx.backend.store_kv``, so a KV transfer moves real bytes that a reader can check. The next
token is the successor of the last one, ``(id + 1) % vocab``, skipping the config's EOS, BOS and
pad ids: generation stops only at max_tokens (or a stop token the caller names). The logits are
0 at that token and -inf everywhere else, so the choice is the same whatever the sampling params.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.kernels.interface import ForwardContext
from tandem.models.errors import ModelLoadError, WeightFileError

SYNTHETIC_ARCHITECTURE = "SyntheticForCausalLM"
SYNTHETIC_GEOMETRY = {"num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8}


def synthetic_config(base: PretrainedConfig) -> PretrainedConfig:
    """``base`` (vocabulary, special tokens, context length kept) with the synthetic KV geometry."""
    config = copy.deepcopy(base)
    for name, value in SYNTHETIC_GEOMETRY.items():
        setattr(config, name, value)
    config.architectures = [SYNTHETIC_ARCHITECTURE]
    return config


def _special_ids(config: PretrainedConfig) -> set[int]:
    ids: set[int] = set()
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


def _successors(vocab_size: int, skipped: set[int]) -> torch.Tensor:
    """[vocab] next token of each id: id + 1, past any run of skipped ids, wrapping around."""
    successor = (torch.arange(vocab_size, dtype=torch.long) + 1) % vocab_size
    skipped_ids = torch.tensor(sorted(skipped), dtype=torch.long)
    for _ in skipped:  # each pass steps over one more id of a run of adjacent skipped ids
        hit = torch.isin(successor, skipped_ids)
        successor[hit] = (successor[hit] + 1) % vocab_size
    return successor


class SyntheticForCausalLM(nn.Module):
    """forward, compute_logits, load_weights, prepare_for_inference, without weights or matmuls."""

    def __init__(self, config: PretrainedConfig, tp: object = None) -> None:
        super().__init__()
        if getattr(tp, "size", 1) > 1:
            raise ModelLoadError("the synthetic model runs on one device only (no tensor parallelism)")
        self.config = config
        self.vocab_size = int(config.vocab_size)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(config.head_dim)
        # The engine reads the KV dtype and device from the model's first parameter.
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.register_buffer("successor", _successors(self.vocab_size, _special_ids(config)), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] -> "hidden" [T, 1] float32: the token id itself (exact below 2^24)."""
        values = input_ids.to(self.anchor.dtype)[:, None, None].expand(-1, self.num_kv_heads, self.head_dim)
        for kv_cache in ctx.kv_caches:
            ctx.backend.store_kv(kv_cache, values, values, ctx.meta)
        return input_ids.to(torch.float32)[:, None]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, 1] -> logits [N, vocab] float32: 0 at the successor of each id, -inf elsewhere."""
        following = self.successor[hidden[:, 0].long()]  # [N]
        logits = torch.full((hidden.shape[0], self.vocab_size), float("-inf"), device=hidden.device)
        return logits.scatter_(1, following[:, None], 0.0)

    def prepare_for_inference(self) -> None:
        """Nothing to prepack."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes no weights; any tensor offered is an error naming it."""
        for name, _ in weights:
            raise WeightFileError(f"checkpoint tensor {name!r}: the synthetic model has no parameters to load")
