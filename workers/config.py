"""Engine configuration: frozen sections, each handed only to the component that needs it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem.workers.scheduler import SchedulerConfig

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DEFAULT_GPU_KV_CACHE_FRACTION = 0.5  # of the GPU memory free after the weights are loaded


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache: sized once at start, in bytes or as a fraction of device memory."""

    block_size: int = 16
    num_bytes: int | None = None
    memory_fraction: float | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_bytes is not None and self.memory_fraction is not None:
            raise ValueError("set kv cache num_bytes or memory_fraction, not both")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction < 1.0:
            raise ValueError("kv cache memory_fraction must be in (0, 1)")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # HF checkpoint directory or .gguf file; None: the embedded SmolLM2
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    show_progress: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tensor_parallel_size: int = 1  # ranks the weights and kv heads are split over (workers/tensor_parallel.py)
    enforce_eager: bool = False  # True: no CUDA graphs for decode (workers/cuda_graphs.py)
    # Overlapped step (workers/overlapped_step.py): schedule step n+1 while the device runs step n.
    # None: on for CUDA, off on the CPU (whose forward blocks anyway); True forces it, False disables.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype
