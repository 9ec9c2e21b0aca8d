"""A model that cannot be loaded fails at LLM(...) with an error naming the file or architecture."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem.models.errors import ModelLoadError, UnsupportedArchitectureError, WeightFileError
from tandem.workers import LLM

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    return tmp_path


def load(path) -> LLM:
    return LLM(model=str(path), device="cpu", show_progress=False)


def test_missing_weight_file(checkpoint) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(WeightFileError, match=str(checkpoint)):
        load(checkpoint)


def test_corrupt_weight_file(checkpoint) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="model.safetensors"):
        load(checkpoint)


def test_unsupported_architecture(checkpoint) -> None:
    config_file = checkpoint / "config.json"
    config = json.loads(config_file.read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        load(checkpoint)


def test_path_that_is_not_a_model(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-dir"):
        load(tmp_path / "no-such-dir")


def test_a_good_checkpoint_still_loads_after_failures(checkpoint) -> None:
    llm = load(checkpoint)
    assert len(llm.generate([[1, 2, 3]])[0].token_ids) >= 1
