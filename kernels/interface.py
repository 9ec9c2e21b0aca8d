"""The attention backend interface: what a model's attention layer calls, whatever the device.

Tokens of all sequences in a step are flattened into one dimension (no padding): sequence i owns
query rows ``query_start_loc[i]:query_start_loc[i+1]``. Its keys and values live in the paged KV
cache, in the blocks listed by row i of ``block_tables``; the new tokens' keys and values are first
written to ``slot_mapping`` (flat slot = block_id * block_size + offset), then attention reads the
whole context (cached prefix plus new tokens) back from the blocks. Prefill, chunked prefill and
decode are one code path: decode is a query of length 1.

Per-layer KV cache view, shape ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (index 0 =
key, 1 = value). It is a view into the cache of all layers (see tandem.kvtransfer.kv_cache), so its
block stride is not its own size: backends must honour strides, never assume contiguity.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch


class BackendKind(enum.Enum):
    """Which implementation runs attention; chosen once at start from what the device offers."""

    TORCH_REFERENCE = "torch"
    CPU = "cpu"  # paged attention and the KV store in C (kernels/cpu_attention.py)
    TRITON = "triton"
    FLASHINFER = "flashinfer"


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where each sequence's queries and context are, for one forward step of the whole batch."""

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    query_lens_cpu: tuple[int, ...]  # host copies, so backends need no device sync to loop
    seq_lens_cpu: tuple[int, ...]
    block_size: int
    # What a backend derives from the fields above, once per step on first use, for every layer
    # to reuse (gather indices, masks): backend-private, keyed by the backend.
    derived: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)


class AttentionBackend(Protocol):
    """One attention implementation. Stateless: everything it needs arrives as arguments."""

    kind: BackendKind

    def store_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Write the new tokens' key/value ([num_tokens, num_kv_heads, head_dim]) into their slots."""
        ...

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of query ([num_tokens, num_heads, head_dim]) over each sequence's
        cached context; returns [num_tokens, num_heads, head_dim]. Grouped-query attention is
        implied by num_heads being a multiple of num_kv_heads."""
        ...


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """What a model's attention layers need for one step; passed down as an argument, never global."""

    backend: AttentionBackend
    meta: AttentionMetadata
    kv_caches: tuple[torch.Tensor, ...]  # one per-layer view per decoder layer
