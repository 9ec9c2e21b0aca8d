"""Mistral on the shared decoder: Llama's layout without biases.

Mistral 7B v0.1 declares a sliding window; our backends attend over the full context, which is
exact for contexts shorter than the window and differs beyond it, so we warn at build time.
"""
from __future__ import annotations

import logging

from transformers import PretrainedConfig

from tandem.models.decoder import DecoderForCausalLM, DecoderOptions
from tandem.models.layers import TensorParallel

logger = logging.getLogger(__name__)


class MistralForCausalLM(DecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, tp: TensorParallel = TensorParallel()) -> None:
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            logger.warning(
                "Mistral sliding_window=%d < max_position_embeddings=%d: attention is full, "
                "outputs differ from the reference past %d tokens",
                window,
                config.max_position_embeddings,
                window,
            )
        super().__init__(config, tp, DecoderOptions())
