"""Streams the tensors of a Hugging Face safetensors checkpoint, one at a time, by parameter name.

Owns finding the weight files of a checkpoint directory (one ``model.safetensors``, or the shards
listed by ``model.safetensors.index.json``) and turning every failure to read them into a
``WeightFileError`` that names the file. Tensors come out on the CPU in their stored dtype; the
model copies each into its own parameters, so at most about one tensor is held here at a time.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tandem.models.errors import WeightFileError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def iter_safetensors_weights(
    model_dir: Path, *, show_progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint in ``model_dir``, lazily."""
    model_dir = Path(model_dir)
    shards = _find_shards(model_dir)
    total = sum(len(names) for names in shards.values()) if shards else None
    with tqdm(
        total=total,
        desc=f"Loading {model_dir.name}",
        unit="tensor",
        file=sys.stderr,
        disable=not show_progress,
    ) as bar:
        for shard, expected in shards.items():
            for name, tensor in _iter_file(shard, expected):
                yield name, tensor
                bar.update(1)


def _find_shards(model_dir: Path) -> dict[Path, list[str]]:
    """Map each weight file to the tensor names it must hold (an empty list: whatever it holds)."""
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {single: _file_keys(single)}
    index = model_dir / INDEX_FILE
    if index.is_file():
        return _read_index(index)
    others = sorted(p.name for p in model_dir.glob("*.bin")) if model_dir.is_dir() else []
    hint = f" (found {', '.join(others)}: only safetensors is supported)" if others else ""
    raise WeightFileError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _read_index(index: Path) -> dict[Path, list[str]]:
    """Group the index's ``weight_map`` by shard, in first-seen order; check every shard exists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"{index}: unreadable safetensors index: {e}") from e
    if not isinstance(weight_map, dict):
        raise WeightFileError(f"{index}: 'weight_map' is not an object")
    shards: dict[Path, list[str]] = {}
    for name, shard_name in weight_map.items():
        shards.setdefault(index.parent / shard_name, []).append(name)
    for shard in shards:
        if not shard.is_file():
            raise WeightFileError(f"{shard}: shard named in {index.name} is missing")
    return shards


def _file_keys(path: Path) -> list[str]:
    """The tensor names stored in one safetensors file (reads only its header)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise WeightFileError(f"{path}: not a readable safetensors file: {e}") from e


def _iter_file(path: Path, expected: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the ``expected`` tensors of one file (all of them if ``expected`` is empty)."""
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise WeightFileError(f"{path}: not a readable safetensors file: {e}") from e
    with handle as f:
        stored = set(f.keys())
        names = expected or sorted(stored)
        missing = [name for name in names if name not in stored]
        if missing:
            raise WeightFileError(f"{path}: lacks tensors the index assigns to it: {missing[:5]}")
        for name in names:
            try:
                tensor = f.get_tensor(name)
            except Exception as e:
                raise WeightFileError(f"{path}: cannot read tensor {name!r}: {e}") from e
            yield name, tensor
