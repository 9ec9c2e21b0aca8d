"""Qwen3 (dense) on the shared decoder: RMSNorm over each q and k head before rotary, an explicit
head_dim from the config (not hidden_size / heads), and HF's ``attention_bias`` on q, k, v and o.
"""
from __future__ import annotations

import logging

from transformers import PretrainedConfig

from tandem.models.decoder import DecoderForCausalLM, DecoderOptions
from tandem.models.layers import TensorParallel

logger = logging.getLogger(__name__)


class Qwen3ForCausalLM(DecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, tp: TensorParallel = TensorParallel()) -> None:
        if getattr(config, "use_sliding_window", False):
            logger.warning("Qwen3 use_sliding_window is set: attention is full, outputs differ past the window")
        attention_bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, tp, DecoderOptions(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True))
