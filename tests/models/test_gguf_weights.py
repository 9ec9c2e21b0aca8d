"""GGUF weights: names and values equal transformers' own load of the same file, exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import LlamaConfig, PretrainedConfig, Qwen3Config

from tandem.models.errors import UnsupportedArchitectureError, WeightFileError
from tandem.models.gguf_weights import iter_gguf_weights, unpermute_rotary_rows
from tandem.models.source import ModelSource, load_config, resolve_model


@pytest.fixture(scope="module")
def embedded() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def embedded_config(embedded: ModelSource) -> PretrainedConfig:
    return load_config(embedded)


@pytest.fixture(scope="module")
def reference(hf_smollm2) -> dict[str, torch.Tensor]:
    """transformers' float32 state dict of the embedded GGUF model: the session's hf_smollm2
    (tests/conftest.py), transformers' own load of the same file, which takes ~14 s to build."""
    return hf_smollm2.state_dict()


def test_embedded_gguf_equals_transformers_exactly(
    embedded: ModelSource, embedded_config: PretrainedConfig, reference: dict[str, torch.Tensor]
) -> None:
    assert embedded.gguf_path is not None
    seen: list[str] = []
    for name, tensor in iter_gguf_weights(embedded.gguf_path, embedded_config, show_progress=False):
        assert name in reference, name
        expected = reference[name]
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected), name
        seen.append(name)
    assert len(seen) == len(set(seen))
    expected_names = set(reference)
    if embedded_config.tie_word_embeddings:
        expected_names.discard("lm_head.weight")
    assert set(seen) == expected_names


def test_embedded_gguf_shape_of_smollm2(
    embedded: ModelSource, embedded_config: PretrainedConfig
) -> None:
    assert embedded.gguf_path is not None
    names = {name: tuple(t.shape) for name, t in _first(embedded.gguf_path, embedded_config, 12)}
    assert names["model.embed_tokens.weight"] == (49152, 576)
    assert names["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert names["model.layers.0.self_attn.k_proj.weight"] == (192, 576)


def _first(path: Path, config: PretrainedConfig, n: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for item in iter_gguf_weights(path, config, show_progress=False):
        out.append(item)
        if len(out) == n:
            break
    return out


def _llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to q/k, written from its definition."""
    rows = weight.shape[0]
    split = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("shape,num_heads", [((24, 5), 3), ((16, 8), 4), ((12,), 2)])
def test_unpermute_inverts_llama_cpp_permutation(shape: tuple[int, ...], num_heads: int) -> None:
    weight = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    permuted = _llama_cpp_permute(weight, num_heads)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rotary_rows(permuted, num_heads), weight)


def test_unpermute_rejects_odd_head_dim() -> None:
    with pytest.raises(WeightFileError):
        unpermute_rotary_rows(torch.zeros(9, 4), 3)


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    writer = GGUFWriter(path, arch)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rand(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_qwen3_names_and_no_permutation(tmp_path: Path) -> None:
    config = Qwen3Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    tensors = {
        "token_embd.weight": _rand(10, 16),
        "output.weight": _rand(10, 16),
        "blk.0.attn_q.weight": _rand(16, 16),
        "blk.0.attn_k.weight": _rand(8, 16),
        "blk.0.attn_q_norm.weight": _rand(8),
        "blk.0.attn_k_norm.weight": _rand(8),
        "blk.0.ffn_norm.weight": _rand(16),
    }
    path = _write_gguf(tmp_path / "tiny.gguf", "qwen3", tensors)
    got = dict(iter_gguf_weights(path, config, show_progress=False))
    expected_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.q_norm.weight": "blk.0.attn_q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight": "blk.0.attn_k_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    }
    assert set(got) == set(expected_names)
    for hf, gguf_name in expected_names.items():
        assert torch.equal(got[hf], torch.from_numpy(tensors[gguf_name])), hf


def test_llama_q_bias_and_f16_are_unpermuted_to_float32(tmp_path: Path) -> None:
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
    q = torch.from_numpy(_rand(8, 8)).half().float()
    k_bias = torch.from_numpy(_rand(4))
    tensors = {
        "blk.3.attn_q.weight": _llama_cpp_permute(q, 2).half().numpy(),
        "blk.3.attn_k.bias": _llama_cpp_permute(k_bias, 1).numpy(),
        "rope_freqs.weight": _rand(2),
    }
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", tensors)
    got = dict(iter_gguf_weights(path, config, show_progress=False))
    assert set(got) == {
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.bias",
    }
    assert got["model.layers.3.self_attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"], q)
    assert torch.equal(got["model.layers.3.self_attn.k_proj.bias"], k_bias)


def test_quantized_q8_0_tensor_dequantizes(tmp_path: Path) -> None:
    values = _rand(4, 64)
    quantized = quantize(values, GGMLQuantizationType.Q8_0)
    path = tmp_path / "q8.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("output_norm.weight", quantized, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    [(name, tensor)] = list(iter_gguf_weights(path, LlamaConfig(), show_progress=False))
    assert name == "model.norm.weight"
    assert tensor.shape == (4, 64)
    assert torch.allclose(tensor, torch.from_numpy(values), atol=0.05)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "g.gguf", "gpt2", {"token_embd.weight": _rand(4, 4)})
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        next(iter_gguf_weights(path, LlamaConfig(), show_progress=False))


def test_unmapped_tensor_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "u.gguf", "llama", {"blk.0.ffn_gate_exps.weight": _rand(4, 4)})
    with pytest.raises(WeightFileError, match="ffn_gate_exps"):
        list(iter_gguf_weights(path, LlamaConfig(), show_progress=False))


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(WeightFileError, match="absent.gguf"):
        next(iter_gguf_weights(missing, LlamaConfig(), show_progress=False))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(WeightFileError, match="corrupt.gguf"):
        next(iter_gguf_weights(corrupt, LlamaConfig(), show_progress=False))


def test_our_tensor_index_equals_gguf_readers_on_the_embedded_file() -> None:
    """models/gguf_index.py replaces GGUFReader for weights: same tensors, types, shapes and bytes."""
    from gguf import GGUFReader

    from tandem.models.gguf_index import read_gguf_index

    path = resolve_model(None).gguf_path
    ours, theirs = read_gguf_index(path), GGUFReader(path)
    assert ours.architecture == "llama"
    assert [(t.name, t.tensor_type, t.shape) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape)) for t in theirs.tensors
    ]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape
        assert np.array_equal(mine.data, reference.data), mine.name


def test_a_gguf_file_cut_short_is_named(tmp_path: Path) -> None:
    path = resolve_model(None).gguf_path
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200_000])  # inside the tokenizer's metadata
    with pytest.raises(WeightFileError, match="not a readable GGUF file"):
        list(iter_gguf_weights(cut, load_config(resolve_model(None))))
