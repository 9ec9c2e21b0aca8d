"""Continuous batching: which sequences run in the next step, and how many tokens each.

No torch, no I/O, no clock: the scheduler sees queues and free blocks, returns a StepPlan, and is
tested without a model. One step mixes decodes and (chunks of) prefills under a token budget:

1. Running sequences first, in admission order: a decode needs one token; an unfinished prefill
   takes the next chunk the budget allows. When the pool runs dry, the most recently admitted
   running sequence is preempted (its blocks freed; it is recomputed later), so older requests
   keep making progress.
2. Then waiting sequences in FIFO order, each starting from its prefix-cache hit, until the token
   budget, the sequence limit or the free blocks run out. Nothing is admitted in a step that had
   to preempt, so a preempted sequence is not immediately re-admitted at another's expense.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.workers.kv_blocks import SequenceBlocks
from tandem.workers.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step: the chunked-prefill budget

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def completes_sequence(self) -> bool:
        """This chunk reaches the last known token, so the step samples a new token for it."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True, slots=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Owns the waiting and running queues of one engine."""

    def __init__(self, config: SchedulerConfig, blocks: SequenceBlocks) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_tokens, preempted):
                continue
            chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
        if not preempted:
            chunks.extend(self._admit_waiting(budget, len(chunks)))
        return StepPlan(tuple(chunks), tuple(preempted))

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Grow seq by num_tokens, preempting the newest running sequences; False if seq itself
        had to be preempted."""
        while not self.blocks.grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int, num_scheduled: int) -> list[ScheduledChunk]:
        admitted: list[ScheduledChunk] = []
        while self.waiting and budget > 0 and num_scheduled + len(admitted) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.cached_prefix(seq)
            num_tokens = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
            if not self.blocks.admit(seq, cached, num_tokens):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            self.running.append(seq)
            admitted.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """Resume a seq whose blocks already hold its computed tokens (its KV came from another
        worker); it decodes from the next step on, behind the sequences already running."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def account_computed(self, chunk: ScheduledChunk) -> int:
        """The step that ran ``chunk`` computed its tokens: advance its sequence and publish the
        blocks that became full. Returns how many of them were prompt tokens."""
        seq = chunk.seq
        start = seq.num_computed_tokens
        prompt_part = max(0, min(start + chunk.num_tokens, seq.num_prompt_tokens) - start)
        seq.num_computed_prompt_tokens += prompt_part
        seq.num_computed_tokens += chunk.num_tokens
        self.blocks.register_full_blocks(seq)
        return prompt_part

    def park(self, seq: Sequence) -> None:
        """Stop scheduling a running seq whose token still in flight surely ends it (max_tokens or
        context length; workers/overlapped_step.py): no step is spent on it. It keeps its blocks
        until finish() frees them."""
        self.running.remove(seq)

    def detach(self, seq: Sequence) -> None:
        """Remove a running seq but keep its blocks: their new owner frees them (a KV lease)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted seq from whichever queue holds it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
