"""The values a worker is configured with and answers with: its role, its settings, and the
results of Prefill, a KV transfer and GetModelInfo."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from tandem.kvtransfer.leases import KVHandle
from tandem.kvtransfer.transfer_types import TransferStats
from tandem.workers.engine import RequestOutput


class Role(enum.Enum):
    CONTEXT = "context"
    GENERATION = "generation"
    AGGREGATED = "aggregated"

    @property
    def serves_prefill(self) -> bool:
        return self is not Role.GENERATION

    @property
    def serves_generate(self) -> bool:
        return self is not Role.CONTEXT


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: Role
    worker_id: str
    epoch: int  # changes on every start: handles, leases and events of an old epoch are refused
    address: str  # the gRPC target peers and routers use to reach this worker
    model: str  # served model name; must match for two workers to pair
    lease_seconds: float = 30.0
    lease_margin_s: float = 0.5
    transfer_timeout_s: float = 10.0
    peer_timeout_s: float = 5.0
    max_concurrent_transfers: int = 16


@dataclass(frozen=True, slots=True)
class PrefillResult:
    output: RequestOutput  # the first token, or the final output when it finished the request
    handle: KVHandle | None


@dataclass(frozen=True, slots=True)
class TransferReport:
    num_blocks: int
    num_cached_blocks: int
    stats: TransferStats
    local_block_ids: tuple[int, ...]  # the prompt's blocks on this worker, cached ones included


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    max_model_len: int
    block_size: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    tokenizer_files: dict[str, bytes]  # file name -> content, as save_pretrained writes them; {}: no tokenizer
