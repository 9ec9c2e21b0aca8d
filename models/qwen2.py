"""Qwen2 / Qwen2.5 on the shared decoder: a bias on q, k and v (not on o).

HF's Qwen2 config only enables its sliding window with ``use_sliding_window``, which the released
checkpoints leave off; when it is on we warn, as attention here is always full.
"""
from __future__ import annotations

import logging

from transformers import PretrainedConfig

from tandem.models.decoder import DecoderForCausalLM, DecoderOptions
from tandem.models.layers import TensorParallel

logger = logging.getLogger(__name__)


class Qwen2ForCausalLM(DecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, tp: TensorParallel = TensorParallel()) -> None:
        if getattr(config, "use_sliding_window", False):
            logger.warning("Qwen2 use_sliding_window is set: attention is full, outputs differ past the window")
        super().__init__(config, tp, DecoderOptions(qkv_bias=True))
