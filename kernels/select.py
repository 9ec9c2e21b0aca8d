"""Choosing the attention backend once, at start, from what the device supports.

Only the torch reference exists so far; FlashInfer and Triton backends will plug in here behind
the same AttentionBackend Protocol.
"""
from __future__ import annotations

import logging

import torch

from tandem.kernels.interface import AttentionBackend
from tandem.kernels.torch_reference import TorchReferenceBackend

logger = logging.getLogger(__name__)


def select_backend(device: torch.device) -> AttentionBackend:
    """The attention backend for ``device``; logs which one and why."""
    if device.type == "cuda":
        reason = "no GPU attention backend is implemented yet"
    else:
        reason = f"only the torch reference runs on {device.type}"
    logger.info("attention backend: torch reference on %s (%s)", device, reason)
    return TorchReferenceBackend()
