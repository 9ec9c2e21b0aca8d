"""Which Tandem class implements a checkpoint: looked up by ``config.architectures[0]``, or by
``config.model_type`` for configs built from GGUF metadata that carry no architectures list."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from tandem.models.errors import UnsupportedArchitectureError
from tandem.models.llama import LlamaForCausalLM
from tandem.models.mistral import MistralForCausalLM
from tandem.models.qwen2 import Qwen2ForCausalLM
from tandem.models.qwen3 import Qwen3ForCausalLM
from tandem.models.synthetic import SYNTHETIC_ARCHITECTURE, SyntheticForCausalLM

_BY_ARCHITECTURE: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    SYNTHETIC_ARCHITECTURE: SyntheticForCausalLM,  # only from source.py's synthetic config
}
_BY_MODEL_TYPE: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def supported_architectures() -> tuple[str, ...]:
    """The checkpoint architectures a model directory or GGUF file may name."""
    return tuple(name for name in _BY_ARCHITECTURE if name != SYNTHETIC_ARCHITECTURE)


def model_class_for(config: PretrainedConfig) -> type[nn.Module]:
    """The model class for ``config``; raises UnsupportedArchitectureError naming what it found."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        name = architectures[0]
        model_class = _BY_ARCHITECTURE.get(name)
    else:
        name = f"model_type {getattr(config, 'model_type', None)!r}"
        model_class = _BY_MODEL_TYPE.get(getattr(config, "model_type", None) or "")
    if model_class is None:
        raise UnsupportedArchitectureError(
            f"architecture {name} is not supported; supported: {', '.join(supported_architectures())}"
        )
    return model_class
