"""From a model name or path to a ready model: config, tokenizer, weights in the target dtype.

The model is built directly on the target device with the target dtype as the default, then the
checkpoint streams into it one tensor at a time (each parameter's weight_loader converts dtype and
picks its tensor-parallel shard), so peak memory is the model plus one tensor. A ``random:<dir>``
model reads no weights: each rank fills the shard it holds with random values on the device.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from tandem.models.layers import TensorParallel
from tandem.models.random_weights import init_random_, seeded_generator
from tandem.models.registry import model_class_for
from tandem.models.source import ModelSource, iter_weights, load_config, load_tokenizer, resolve_model

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    source: ModelSource
    config: PretrainedConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None  # None: a bare checkpoint, served on token ids only
    eos_token_ids: frozenset[int]
    max_model_len: int


def load_model(
    model: str | os.PathLike | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = True,
    tp: TensorParallel = TensorParallel(),
) -> LoadedModel:
    """Load the model named by `model` (None: the embedded SmolLM2) onto device in dtype;
    with `tp`, only that tensor-parallel rank's shard of every weight."""
    started = time.perf_counter()
    source = resolve_model(model)
    config = load_config(source)
    model_class = model_class_for(config)
    with torch.device(device), default_dtype(dtype):
        module = model_class(config, tp) if tp.size > 1 else model_class(config)
    if source.random_weights:
        init_random_(module, generator=seeded_generator(device, seed=tp.rank))  # a rank draws its own shard
        logger.warning("%s: random weights (random:<dir>), for benchmarks only: the outputs mean nothing", source.name)
    else:
        module.load_weights(iter_weights(source, show_progress=show_progress, config=config))
    module.eval()
    module.prepare_for_inference()
    tokenizer = load_tokenizer(source) if _has_tokenizer(source) else None
    logger.info(
        "loaded %s (%s) on %s as %s in %.1f s",
        source.name, model_class.__name__, device, dtype, time.perf_counter() - started,
    )
    return LoadedModel(
        source=source,
        config=config,
        model=module,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(source, config, tokenizer),
        max_model_len=int(getattr(config, "max_position_embeddings", 2048)),
    )


def _has_tokenizer(source: ModelSource) -> bool:
    if source.gguf_file is not None:
        return True
    return any((source.path / name).exists() for name in TOKENIZER_FILES)


def _eos_token_ids(
    source: ModelSource, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> frozenset[int]:
    """EOS ids from every place a checkpoint may declare them (Llama 3 lists several in
    generation_config.json), so generation stops where transformers' generate would."""
    ids: set[int] = set(_as_ids(getattr(config, "eos_token_id", None)))
    if source.gguf_file is None and (source.path / "generation_config.json").exists():
        generation = GenerationConfig.from_pretrained(source.path, local_files_only=True)
        ids.update(_as_ids(generation.eos_token_id))
    if tokenizer is not None:
        ids.update(_as_ids(tokenizer.eos_token_id))
    return frozenset(ids)


def _as_ids(value: int | list[int] | None) -> Iterator[int]:
    if value is None:
        return iter(())
    return iter([value] if isinstance(value, int) else value)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
