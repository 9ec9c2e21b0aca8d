"""Cheap random weights, in place: for benchmarks of a model's shape without its checkpoint.

Used by the loader for ``--model random:<dir>`` (models/source.py) and by the GPU benchmark scripts.
Each tensor-parallel rank fills only the shard it holds, from a generator seeded with its rank (the
loader's choice), so a load is reproducible and the ranks' shards differ; replicated vectors (norm
weights) are ones on every rank.
"""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_STD = 0.02


@torch.no_grad()
def init_random_(module: nn.Module, std: float = DEFAULT_STD, generator: torch.Generator | None = None) -> None:
    """Matrices N(0, std), vectors (norm weights, biases) ones, in place; ``generator`` must live on
    the parameters' device (None: torch's default generator)."""
    for param in module.parameters():
        if param.dim() > 1:
            param.normal_(0.0, std, generator=generator)
        else:
            param.fill_(1.0)


def seeded_generator(device: torch.device, seed: int = 0) -> torch.Generator:
    """A generator on ``device`` (``cuda`` without an index: the current device) seeded with ``seed``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(device=device).manual_seed(seed)
