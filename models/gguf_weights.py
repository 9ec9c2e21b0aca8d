"""Streams the tensors of a GGUF file as float32 tensors under Hugging Face parameter names.

Owns the mapping from llama.cpp tensor names (``blk.N.attn_q.weight``) to Hugging Face ones
(``model.layers.N.self_attn.q_proj.weight``), dequantization (through ``gguf.quants``; the file's
tensor index comes from models/gguf_index.py), the
reshape from GGML's reversed dimension order, and undoing the row permutation that llama.cpp's
converter applies to the q and k projections of ``llama`` models. With it, a GGUF model loads
through the same ``load_weights`` path as a safetensors checkpoint.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize
from tqdm import tqdm
from transformers import PretrainedConfig

from tandem.models.errors import UnsupportedArchitectureError, WeightFileError
from tandem.models.gguf_index import GGUFIndex, GGUFTensor, read_gguf_index

# GGUF ``general.architecture`` values whose tensor names follow the table below.
SUPPORTED_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3"})
# Architectures whose q/k rows llama.cpp permutes for its rotary layout.
PERMUTED_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp stores that are derived from the config and have no HF parameter.
_SKIPPED = frozenset({"rope_freqs.weight"})
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_PATTERN = re.compile(r"(\w+)\.(weight|bias)")


def iter_gguf_weights(
    gguf_path: Path, config: PretrainedConfig, *, show_progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for every parameter tensor in ``gguf_path``, lazily."""
    gguf_path = Path(gguf_path)
    index = _open(gguf_path)
    architecture = index.architecture
    if architecture is None:
        raise WeightFileError(f"{gguf_path}: GGUF metadata lacks general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    tensors = [t for t in index.tensors if t.name not in _SKIPPED]
    for tensor in tqdm(
        tensors, desc=f"Loading {gguf_path.name}", unit="tensor", file=sys.stderr,
        disable=not show_progress,
    ):
        name = hf_name(tensor.name, gguf_path)
        weight = _dequantize(tensor, gguf_path)
        if architecture in PERMUTED_ARCHITECTURES:
            if ".self_attn.q_proj." in name:
                weight = unpermute_rotary_rows(weight, num_heads)
            elif ".self_attn.k_proj." in name:
                weight = unpermute_rotary_rows(weight, num_kv_heads)
        yield name, weight


def hf_name(gguf_name: str, gguf_path: Path) -> str:
    """Translate one llama.cpp tensor name to its Hugging Face parameter name."""
    if match := _LAYER_PATTERN.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif match := _GLOBAL_PATTERN.fullmatch(gguf_name):
        part, kind = match.groups()
        if part in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[part]}.{kind}"
    raise WeightFileError(f"{gguf_path}: tensor {gguf_name!r} has no Hugging Face mapping")


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, restoring the Hugging Face (half-split) row order.

    Per head, HF stores the rotary pairs as halves ``[x0..x_{d/2-1}, y0..y_{d/2-1}]``;
    llama.cpp interleaves them ``[x0, y0, x1, y1, ...]``. Works for weights and biases.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    if head_dim * num_heads != rows or head_dim % 2:
        raise WeightFileError(f"cannot split {rows} q/k rows into {num_heads} heads of even size")
    # (rows, *rest) -> (heads, head_dim/2, 2, *rest) -> (heads, 2, head_dim/2, *rest)
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape).contiguous()


def _open(gguf_path: Path) -> GGUFIndex:
    if not gguf_path.is_file():
        raise WeightFileError(f"{gguf_path}: GGUF file not found")
    try:
        return read_gguf_index(gguf_path)
    except Exception as e:  # a format error, an unknown GGML type, OSError, ...
        raise WeightFileError(f"{gguf_path}: not a readable GGUF file: {e}") from e


def _dequantize(tensor: GGUFTensor, gguf_path: Path) -> torch.Tensor:
    """Dequantize one tensor to float32 in the HF shape (GGML lists dimensions innermost first)."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise WeightFileError(
            f"{gguf_path}: cannot dequantize {tensor.name!r} ({tensor.tensor_type.name}): {e}"
        ) from e
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # F32 data is a read-only view of the memory-mapped file: copy it so the tensor owns its memory.
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(values).reshape(shape)
