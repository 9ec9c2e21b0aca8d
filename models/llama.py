"""Llama 2 and Llama 3.x (3.1/3.2 rope scaling included) on the shared decoder.

HF's ``attention_bias`` puts a bias on q, k, v and o alike; ``mlp_bias`` on gate, up and down.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from tandem.models.decoder import DecoderForCausalLM, DecoderOptions
from tandem.models.layers import TensorParallel


def llama_options(config: PretrainedConfig) -> DecoderOptions:
    attention_bias = bool(getattr(config, "attention_bias", False))
    return DecoderOptions(
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__(config, tp, llama_options(config))
