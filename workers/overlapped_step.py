"""The overlapped ("lag-one", async) engine step: the host schedules and launches step n+1 before
step n's sampled tokens have reached it, so the device does not sit idle while the host schedules,
builds inputs, checks stops and detokenizes (vLLM v1's async scheduling, SGLang's overlap
scheduler).

At most one step is in flight. An engine step() that overlaps does, in this order:

1. ``launch``: the runner computes step n+1. A row whose input is the token its sequence sampled in
   step n (still on the device; the sequence holds PLACEHOLDER_TOKEN_ID for it) takes it from
   step n's token tensor by a gather on the device (model_runner.DeviceInputs). The sampler picks
   step n+1's tokens on the device and a non-blocking copy sends them towards pinned host memory.
2. ``resolve``: wait for step n's copy (usually done by then) and give the engine each live
   sequence's real token in place of its placeholder; the engine appends it, runs the stop checks
   and the detokenizer exactly as in the synchronous step, and returns step n's outputs. So step()
   returns every output one step late, and each request gets the same outputs as without overlap.
3. The engine accounts step n+1's computed tokens and registers full blocks (after 2: no prefix
   hash ever covers a placeholder); then ``hold`` gives each live sequence that step n+1 sampled
   for a placeholder, so the next schedule sees its true length, positions, slots and blocks.

A sequence that step n finished was already in step n+1: that row is dropped and its blocks are
freed at once (a later step that reuses them runs after step n+1 on the same stream). A sequence
that its token in flight surely ends (max_tokens, context length) is parked rather than scheduled,
so no step is spent on it. Preemption happens only while scheduling, and a step that preempted
admits nothing, so a preempted sequence's placeholder is resolved before it is recomputed.

The engine runs its synchronous step instead, after draining the step in flight, whenever lag-one
cannot be exact: a sampled row with penalties or logprobs (the host's token history and the
logits' host copy), a hand_off_kv request (it ends at its first token), tensor parallelism (the
followers would need the device's tokens). Seeded and temperature sampling stay overlapped: each
request's generator draws once per launched step, in launch order, as in the synchronous step.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tandem.workers.model_runner import DeviceInputs, ModelRunner
from tandem.workers.sampler import Sampler, SamplingInput, uses_penalties
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import ScheduledChunk, Scheduler
from tandem.workers.sequence import PLACEHOLDER_TOKEN_ID, Sequence

logger = logging.getLogger(__name__)


def overlap_enabled(setting: bool | None, device: torch.device, tensor_parallel: bool) -> bool:
    """EngineConfig.async_scheduling resolved for one engine, and logged: None means on for CUDA
    (the forward runs asynchronously there) and off elsewhere (the CPU's forward blocks anyway)."""
    enabled = device.type == "cuda" if setting is None else setting
    why = f"default on {device.type}" if setting is None else "async_scheduling set"
    if enabled and tensor_parallel:
        enabled, why = False, "tensor-parallel followers need every step's tokens on the host"
    logger.info("overlapped (async) scheduling %s (%s)", "on" if enabled else "off", why)
    return enabled


class SampledTokens:
    """One step's sampled token ids: left on the device for the next step's inputs, and copied to
    the host without blocking, for the stop checks."""

    def __init__(self, token_ids: torch.Tensor) -> None:
        self.on_device = token_ids  # [n] int64
        self._ready: torch.cuda.Event | None = None
        self._host = token_ids  # the CPU's forward has finished: nothing to wait for
        if token_ids.device.type == "cuda":
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()  # on the current stream, after the copy

    def tolist(self) -> list[int]:
        """The token ids, once the device has produced and copied them."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


@dataclass(frozen=True, slots=True)
class InFlight:
    """A launched step whose tokens the host has not seen yet."""

    seqs: tuple[Sequence, ...]  # the sequence of each sampled row, in row order
    tokens: SampledTokens

    def device_inputs(self, chunks: Seq[ScheduledChunk]) -> DeviceInputs | None:
        """The rows of the next step whose input id is one of this step's tokens. Every sequence
        that holds a placeholder is a row of this step, and its next chunk is that one token."""
        row_of = {seq.request_id: row for row, seq in enumerate(self.seqs)}
        rows: list[int] = []
        sources: list[int] = []
        end = 0
        for chunk in chunks:
            end += chunk.num_tokens
            if chunk.seq.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                rows.append(end - 1)
                sources.append(row_of[chunk.seq.request_id])
        return DeviceInputs(self.tokens.on_device, tuple(rows), tuple(sources)) if rows else None


class OverlappedStep:
    """The engine's step in flight, if any: launches the next step over it, then resolves it."""

    def __init__(
        self, runner: ModelRunner, sampler: Sampler, scheduler: Scheduler, max_model_len: int, device: torch.device,
        enabled: bool,
    ) -> None:
        self.enabled = enabled  # may change between steps (a benchmark compares both): the next step drains
        self.num_launched = 0  # steps launched overlapped, for tests and benchmarks
        self._runner = runner
        self._device = device
        self._sampler = sampler
        self._scheduler = scheduler
        self._max_model_len = max_model_len
        self._in_flight: InFlight | None = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def can_launch(self, params: Seq[SamplingParams], hand_off: bool) -> bool:
        """Whether a step whose sampled rows ask for ``params`` can run overlapped: every row's
        token must follow from the device alone, and none may be needed on the host at once (a
        hand-off ends its request at this token)."""
        return self.enabled and not hand_off and not any(uses_penalties(p) or p.logprobs is not None for p in params)

    def launch(self, chunks: Seq[ScheduledChunk], seqs: Seq[Sequence], rows: Seq[SamplingInput]) -> InFlight | None:
        """Queue one step on the device, reading the tokens of the step in flight, and return that
        step for resolve(). ``seqs`` and ``rows``: the sampled sequences and their sampling
        inputs, in plan order. Nothing here waits for the device. If it raises, the step in
        flight stays in flight."""
        previous = self._in_flight
        inputs = None if previous is None else previous.device_inputs(chunks)
        logits = self._runner.execute(chunks, inputs)
        token_ids = self._sampler.sample(logits, rows) if rows else None
        self._in_flight = None if token_ids is None else InFlight(tuple(seqs), SampledTokens(token_ids))
        self.num_launched += 1
        return previous

    def resolve(self, step: InFlight | None) -> list[tuple[Sequence, int]]:
        """Wait for ``step``'s tokens. Each live sequence's placeholder is taken off and returned
        with its real token, in row order, for the engine to append as the synchronous step does;
        a finished sequence's row (aborted since, or ended by its previous token) is dropped."""
        if step is None:
            return []
        resolved = []
        for seq, token_id in zip(step.seqs, step.tokens.tolist()):
            if seq.is_finished:
                continue
            assert seq.token_ids[-1] == PLACEHOLDER_TOKEN_ID, f"{seq.request_id} has no token in flight"
            seq.token_ids.pop()
            resolved.append((seq, token_id))
        return resolved

    def drain(self) -> list[tuple[Sequence, int]]:
        """Resolve the step in flight without launching another: the next step runs synchronously."""
        step, self._in_flight = self._in_flight, None
        return self.resolve(step)

    def hold(self) -> None:
        """Give each live sequence of the step just launched a placeholder for its token in flight;
        park those that this token surely ends. Call after resolving the step before it."""
        if self._in_flight is None:
            return
        for seq in self._in_flight.seqs:
            if seq.is_finished:  # ended by the token just resolved: this step's row is dropped
                continue
            seq.token_ids.append(PLACEHOLDER_TOKEN_ID)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self._max_model_len:
                self._scheduler.park(seq)

    def discard(self) -> list[Sequence]:
        """Forget the step in flight (a launch failed); returns its sequences for the engine to abort."""
        step, self._in_flight = self._in_flight, None
        return [] if step is None else list(step.seqs)

    def wait_device(self) -> None:
        """Until the device has run every step launched. A step may still write blocks freed while
        it was in flight (a finished sequence's dropped row, an abort): wait before anything outside
        the stream writes freed blocks (a NIXL READ into blocks from reserve_prefilled)."""
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
