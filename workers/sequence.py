"""One request's state inside a worker engine: its tokens, its KV blocks and where it stands, and
what a step reports of it (RequestOutput; tandem.workers.engine re-exports it).

Life cycle: WAITING -> RUNNING -> FINISHED, with RUNNING -> WAITING on preemption (its blocks are
freed and its tokens, prompt and output alike, are recomputed when it is scheduled again).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.kvtransfer.block_hash import BlockHash
from tandem.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tandem.workers.sampler import TokenLogprobs  # torch: the scheduler side stays without it

# An output token that is still on the device: the overlapped step (workers/overlapped_step.py)
# schedules the next step before the last one's tokens reach the host. Never hashed, never computed
# from the host: the runner takes its input id from the device.
PLACEHOLDER_TOKEN_ID = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    """Why a sequence stopped; values are the OpenAI `finish_reason` strings."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose KV is in this sequence's blocks
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full, computed blocks
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_computed_prompt_tokens: int = 0  # prompt tokens this engine actually ran (recompute included)
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    queue_seconds: float | None = None  # arrival to first scheduled step: the TTFT waterfall's queue

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class HeldKV:
    """Blocks holding the KV of a handed-off prompt; the caller owns them until release_blocks."""

    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request: a delta, plus totals for usage accounting."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    new_logprobs: tuple[TokenLogprobs, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int
    held_kv: HeldKV | None = None  # a hand_off_kv request after its first token: the engine is done with it
    queue_seconds: float | None = None  # arrival to first scheduled step; None while still waiting

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.held_kv is not None
