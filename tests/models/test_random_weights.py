"""``random:<dir>``: a directory with a config and no weights loads with random weights; the same
directory without the prefix still fails, naming the missing weight file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TINY_LLAMA
from transformers import LlamaConfig

from tandem.models.errors import ModelLoadError, WeightFileError
from tandem.models.layers import TensorParallel
from tandem.models.loader import load_model
from tandem.models.random_weights import init_random_, seeded_generator
from tandem.models.source import ModelSource, resolve_model
from tandem.workers import LLM, SamplingParams


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("random-tiny-llama")
    LlamaConfig(**TINY_LLAMA, architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def test_resolves_to_a_random_weights_source(config_dir: Path) -> None:
    assert resolve_model(f"random:{config_dir}") == ModelSource(config_dir, None, random_weights=True)
    with pytest.raises(ModelLoadError, match="random:.*no config.json"):
        resolve_model(f"random:{config_dir / 'missing'}")


def test_loads_random_weights_and_generates(config_dir: Path) -> None:
    loaded = load_model(f"random:{config_dir}", dtype=torch.float32, device=torch.device("cpu"), show_progress=False)
    params = dict(loaded.model.named_parameters())
    matrices = [p for p in params.values() if p.dim() > 1]
    assert matrices and all(0.015 < p.float().std().item() < 0.025 for p in matrices if p.numel() >= 1024)
    assert all(torch.equal(p, torch.ones_like(p)) for p in params.values() if p.dim() == 1)
    assert loaded.tokenizer is None  # no tokenizer files in the directory: token ids only

    llm = LLM(model=f"random:{config_dir}", device="cpu", show_progress=False)
    params_ = SamplingParams(max_tokens=5, ignore_eos=True)
    first = llm.generate([[1, 2, 3, 4]], params_)[0].token_ids
    assert len(first) == 5 and all(0 <= t < TINY_LLAMA["vocab_size"] for t in first)
    again = LLM(model=f"random:{config_dir}", device="cpu", show_progress=False).generate([[1, 2, 3, 4]], params_)
    assert again[0].token_ids == first  # seeded: the same weights every load


def test_each_tensor_parallel_rank_draws_its_own_shard(config_dir: Path) -> None:
    def load(tp: TensorParallel) -> dict[str, torch.Tensor]:
        loaded = load_model(f"random:{config_dir}", dtype=torch.float32, device=torch.device("cpu"), show_progress=False, tp=tp)
        return dict(loaded.model.named_parameters())

    full, rank0, rank1 = load(TensorParallel()), load(TensorParallel(0, 2)), load(TensorParallel(1, 2))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert rank0[qkv].shape[0] == rank1[qkv].shape[0] == full[qkv].shape[0] // 2
    assert not torch.equal(rank0[qkv], rank1[qkv])
    assert torch.equal(rank0["model.norm.weight"], rank1["model.norm.weight"])


def test_the_plain_directory_still_needs_weights(config_dir: Path) -> None:
    with pytest.raises(WeightFileError, match=f"{config_dir}: no model.safetensors"):
        LLM(model=str(config_dir), device="cpu", show_progress=False)


def test_init_random_draws_matrices_and_fills_vectors() -> None:
    layer = torch.nn.Linear(64, 32)
    init_random_(layer, std=0.5, generator=seeded_generator(torch.device("cpu"), seed=3))
    assert 0.4 < layer.weight.std().item() < 0.6
    assert torch.equal(layer.bias, torch.ones(32))
