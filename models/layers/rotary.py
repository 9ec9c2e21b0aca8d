"""Rotary position embedding: reading the rope settings from an HF config, the inverse frequencies
of each supported rope type, and applying the rotation with HF's rotate-half convention.

Settings come from transformers 5 ``config.rope_parameters`` (a dict with rope_type, rope_theta,
factor, ...) or, for older configs, ``config.rope_scaling`` plus ``config.rope_theta``. Supported
types: ``default``, ``linear`` and ``llama3`` (Llama 3.1/3.2 frequency smoothing). Others, and
per-layer-type rope dicts, raise ModelLoadError rather than run with wrong positions.

cos/sin are computed on the fly from the positions (no table sized by max_position_embeddings),
once per forward step, in float32, then cast to the activation dtype, exactly as HF does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.models.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Everything that decides the inverse frequencies."""

    rope_type: str = "default"
    theta: float = DEFAULT_ROPE_THETA
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3


def _rope_dict(config: PretrainedConfig) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = getattr(config, "rope_scaling", None)
    params = dict(params or {})
    if params and all(isinstance(value, dict) for value in params.values()):
        raise ModelLoadError(f"per-layer-type rope parameters are not supported: {sorted(params)}")
    return params


def rope_spec_from_config(config: PretrainedConfig) -> RopeSpec:
    """Read the rope settings from either config generation; raises on an unsupported type."""
    params = _rope_dict(config)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1.0):
        raise ModelLoadError(f"partial_rotary_factor {partial} is not supported")
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or DEFAULT_ROPE_THETA
    original_max = params.get("original_max_position_embeddings") or config.max_position_embeddings
    return RopeSpec(
        rope_type=rope_type,
        theta=float(theta),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(original_max),
    )


def _llama3_scale(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend smoothly between."""
    low_freq_wavelen = spec.original_max_position / spec.low_freq_factor
    high_freq_wavelen = spec.original_max_position / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies for ``spec``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        return _llama3_scale(inv_freq, spec)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin), each [T, head_dim], laid out as HF's cat(freqs, freqs)."""

    def __init__(self, head_dim: int, spec: RopeSpec) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.spec = spec
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self._inv_freq = inverse_frequencies(spec, head_dim)

    @property
    def inv_freq(self) -> torch.Tensor:  # [head_dim / 2] float32
        return self._inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float().unsqueeze(-1) * self._inv_freq  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        return RotaryTables(emb.cos().to(dtype), emb.sin().to(dtype))


class RotaryTables:
    """One step's cos and sin ([T, head_dim] each, HF's layout), shared by every layer.

    The torch path rotates with ``rotate``: ``rotate_half(x) * sin`` equals
    ``roll(x, head_dim / 2) * signed_sin`` bit for bit (negation is exact), which is two ops
    fewer per call, and the broadcast forms are built once per step instead of once per layer.
    """

    __slots__ = ("cos", "sin", "_broadcast")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos = cos
        self.sin = sin
        self._broadcast: tuple[torch.Tensor, torch.Tensor] | None = None

    def broadcast(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos [T, 1, head_dim], signed sin [T, 1, head_dim]) for ``rotate``."""
        if self._broadcast is None:
            half = self.sin.shape[-1] // 2
            signed_sin = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)
            self._broadcast = (self.cos.unsqueeze(1), signed_sin.unsqueeze(1))
        return self._broadcast


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] -> HF's ``x * cos + rotate_half(x) * sin``, with the tables of
    ``RotaryTables.broadcast``."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin
