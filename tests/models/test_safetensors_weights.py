"""Safetensors weights: single and sharded checkpoints stream exactly the saved state dict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem.models.errors import WeightFileError
from tandem.models.safetensors_weights import INDEX_FILE, SINGLE_FILE, iter_safetensors_weights


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


def _save(
    tmp_path: Path, max_shard_size: str | None = None
) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _tiny_llama()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path, **kwargs)
    return tmp_path, model.state_dict()


def _assert_same(model_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    names = []
    for name, tensor in iter_safetensors_weights(model_dir, show_progress=False):
        assert tensor.device.type == "cpu"
        assert tensor.dtype == torch.bfloat16, name  # stored dtype, no conversion here
        assert torch.equal(tensor, state_dict[name]), name
        names.append(name)
    assert sorted(names) == sorted(state_dict)


def test_single_file(tmp_path: Path) -> None:
    model_dir, state_dict = _save(tmp_path)
    assert (model_dir / SINGLE_FILE).is_file()
    _assert_same(model_dir, state_dict)


def test_sharded(tmp_path: Path) -> None:
    model_dir, state_dict = _save(tmp_path, max_shard_size="20KB")
    index = json.loads((model_dir / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (model_dir / SINGLE_FILE).exists()
    _assert_same(model_dir, state_dict)


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, state_dict = _save(tmp_path)
    assert len(list(iter_safetensors_weights(model_dir, show_progress=True))) == len(state_dict)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{len(state_dict)}/{len(state_dict)}" in captured.err


def test_is_lazy(tmp_path: Path) -> None:
    model_dir, _ = _save(tmp_path, max_shard_size="20KB")
    stream = iter_safetensors_weights(model_dir, show_progress=False)
    name, tensor = next(stream)
    assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    stream.close()


def test_no_weight_file(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightFileError, match="only safetensors") as info:
        next(iter_safetensors_weights(tmp_path, show_progress=False))
    assert str(tmp_path) in str(info.value)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    model_dir, _ = _save(tmp_path, max_shard_size="20KB")
    shard = sorted(set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    (model_dir / shard).unlink()
    with pytest.raises(WeightFileError, match=shard):
        next(iter_safetensors_weights(model_dir, show_progress=False))


def test_truncated_file_is_named(tmp_path: Path) -> None:
    model_dir, _ = _save(tmp_path)
    path = model_dir / SINGLE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightFileError, match=SINGLE_FILE) as info:
        list(iter_safetensors_weights(model_dir, show_progress=False))
    assert info.value.__cause__ is not None


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    model_dir, _ = _save(tmp_path, max_shard_size="20KB")
    shard = sorted(set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    path = model_dir / shard
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match=shard):
        list(iter_safetensors_weights(model_dir, show_progress=False))


def test_garbage_header_is_named(tmp_path: Path) -> None:
    (tmp_path / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightFileError, match=SINGLE_FILE):
        list(iter_safetensors_weights(tmp_path, show_progress=False))


def test_index_naming_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    model_dir, _ = _save(tmp_path, max_shard_size="20KB")
    index_path = model_dir / INDEX_FILE
    index = json.loads(index_path.read_text())
    first_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.extra.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match="model.extra.weight"):
        list(iter_safetensors_weights(model_dir, show_progress=False))
