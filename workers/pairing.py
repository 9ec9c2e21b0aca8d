"""What two workers must agree on before one reads the other's KV blocks.

A block is raw bytes: it only means the same thing on both sides when the model, the block
geometry, the dtype and the layout are the same. A generation worker checks this against the
context worker's transfer metadata before its first READ and refuses to pair, naming every
difference, instead of decoding garbage.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

KV_LAYOUT = "block_major_v1"  # [blocks, layers, 2, block_size, kv_heads, head_dim], kvtransfer/kv_cache.py


@dataclass(frozen=True, slots=True)
class PairingInfo:
    model: str
    block_size: int
    kv_dtype: str  # torch dtype name without the "torch." prefix
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = KV_LAYOUT

    def mismatches(self, peer: PairingInfo) -> list[str]:
        """Human-readable differences, empty when the two can pair."""
        return [
            f"{f.name} {getattr(peer, f.name)!r} there, {getattr(self, f.name)!r} here"
            for f in fields(self)
            if getattr(self, f.name) != getattr(peer, f.name)
        ]
