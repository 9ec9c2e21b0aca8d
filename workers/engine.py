"""The engine of one worker: requests in, tokens and text out, one scheduler step at a time.

Each step: the scheduler plans which sequences run and how many tokens each; the model runner
computes them into the paged KV cache; the sampler picks a token for every sequence whose known
tokens are now all computed; stop conditions and the detokenizer turn tokens into outputs. Every
finished, aborted or failed request returns its blocks to the pool. Overlapped (async scheduling,
workers/overlapped_step.py), a step is launched before the last one's tokens reach the host, and
step() returns the outputs of the step launched by the call before.

Disaggregation adds two ways in and out of the engine. A context worker adds a request with
``hand_off_kv=True``: after its first token the engine lets go of the request but not of its
blocks, which the output hands to the caller (a KV lease) until ``release_blocks``. A generation
worker calls ``reserve_prefilled`` for a prompt whose KV lives elsewhere, fills the returned
blocks (a NIXL READ), then ``commit_prefilled`` starts decoding, or ``cancel_prefilled`` gives up.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from tandem.kernels.select import select_backend
from tandem.kvtransfer.block_pool import BlockPool, NoFreeBlocksError
from tandem.kvtransfer.kv_cache import allocate_kv_cache, layer_views
from tandem.kvtransfer.wire_blocks import ShardedBlocks
from tandem.models.loader import LoadedModel, load_model
from tandem.workers.config import EngineConfig, resolve_device, resolve_dtype
from tandem.workers.cuda_graphs import capture_decode_graphs, release_decode_graphs
from tandem.workers.detokenizer import IncrementalDetokenizer
from tandem.workers.errors import InvalidRequestError
from tandem.workers.kv_blocks import SequenceBlocks, blocks_for_tokens
from tandem.workers.kv_cache_sizing import context_length, kv_cache_spec, num_kv_cache_blocks
from tandem.workers.model_runner import ModelRunner
from tandem.workers.overlapped_step import OverlappedStep, overlap_enabled
from tandem.workers.sampler import Sampler, SamplingInput, TokenLogprobs, make_generator
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import ScheduledChunk, Scheduler
from tandem.workers.sequence import PLACEHOLDER_TOKEN_ID, FinishReason, HeldKV, RequestOutput, Sequence
from tandem.workers.tensor_parallel_wire import TensorParallelError

if TYPE_CHECKING:
    from tandem.workers.tensor_parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVReservation:
    """Blocks reserved for a prompt whose KV comes from another worker. The first
    ``num_cached_blocks`` already hold it (this worker's prefix cache); the rest must be filled."""

    block_ids: tuple[int, ...]
    num_cached_blocks: int

    @property
    def blocks_to_fill(self) -> tuple[int, ...]:
        return self.block_ids[self.num_cached_blocks :]


@dataclass(slots=True, eq=False)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    hand_off_kv: bool = False


class LLMEngine:
    """A continuous-batching engine over one model on one device. Not thread-safe: one caller
    drives step(); the serving layers above own concurrency."""

    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, device: torch.device, tp_group: TensorParallelGroup | None = None
    ) -> None:
        self.config = config
        self.tokenizer: PreTrainedTokenizerBase | None = loaded.tokenizer
        self.hf_config = loaded.config  # what a model card for another frontend (Dynamo) is written from
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = int(loaded.config.vocab_size)
        self.device = device
        self.tensor_parallel_size = tp_size = 1 if tp_group is None else tp_group.size
        spec = kv_cache_spec(loaded.config, config.cache.block_size, next(loaded.model.parameters()).dtype, tp_size)
        num_blocks = num_kv_cache_blocks(spec, config, device)
        if tp_group is not None:
            num_blocks = tp_group.agree_num_blocks(num_blocks)  # same block ids on every rank
        self._tp_group = tp_group
        self.pool = BlockPool(num_blocks, spec.block_size, config.cache.enable_prefix_caching)
        self.max_model_len = context_length(config, loaded.max_model_len, num_blocks, spec.block_size)
        self.scheduler = Scheduler(config.scheduler, SequenceBlocks(self.pool))
        kv_cache = allocate_kv_cache(spec, num_blocks, device)
        backend = select_backend(device)
        self.kv_cache_spec = spec
        self.kv_cache = kv_cache  # the one tensor a transfer engine registers
        self.runner = ModelRunner(loaded.model, layer_views(kv_cache), backend, spec.block_size, device)
        if device.type == "cuda" and not config.enforce_eager:  # tensor parallel: each follower captures alike now
            self.runner.graphs = capture_decode_graphs(self.runner, self.max_model_len, config.scheduler.max_num_seqs)
        if tp_group is not None:
            self.runner = tp_group.wrap(self.runner)  # broadcasts each step to the other ranks
        self.sampler = Sampler()
        overlap = overlap_enabled(config.async_scheduling, device, tp_group is not None)
        self.overlapped = OverlappedStep(self.runner, self.sampler, self.scheduler, self.max_model_len, device, overlap)
        self.requests: dict[str, _Request] = {}
        self._receiving: dict[str, _Request] = {}  # reserved by reserve_prefilled, not yet committed
        self._finished_outputs: list[RequestOutput] = []
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (cache hits excluded)
        self.num_preemptions = 0
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
            num_blocks, spec.block_size, num_blocks * spec.bytes_per_block / 2**20, self.max_model_len,
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        if config.tensor_parallel_size > 1:
            from tandem.workers.tensor_parallel import start_engine  # it imports this module

            return start_engine(config, device, dtype)
        loaded = load_model(config.model, dtype=dtype, device=device, show_progress=config.show_progress)
        return cls(loaded, config, device)

    def sharded_kv(self) -> ShardedBlocks | None:
        """The KV cache as whole wire blocks gathered from and scattered to the tensor-parallel
        ranks (kvtransfer/wire_blocks.py); None on one rank, whose cache is the wire format."""
        if self._tp_group is None:
            return None
        from tandem.workers.tensor_parallel_kv import TensorParallelBlocks

        return TensorParallelBlocks(self._tp_group, self.kv_cache)

    def close(self) -> None:
        """Stop the tensor-parallel followers, if any; no step can run afterwards."""
        if self._tp_group is not None:
            release_decode_graphs(self.runner.local)  # before the communicator they captured goes
            self._tp_group.close()

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | Seq[int], params: SamplingParams, *, hand_off_kv: bool = False
    ) -> None:
        """Queue a request. Raises InvalidRequestError, changing nothing, when it can't be served.

        With hand_off_kv, the request ends after its first token unless that token finished it: its
        last output carries the blocks (``held_kv``), which stay allocated until release_blocks."""
        self._check_new_request(request_id, params)
        token_ids = self._tokenize(request_id, prompt)
        request = self._new_request(Sequence(request_id, token_ids, params))
        request.hand_off_kv = hand_off_kv
        self.requests[request_id] = request
        self.scheduler.add(request.seq)

    def release_blocks(self, block_ids: Seq[int]) -> None:
        """Return the blocks of a HeldKV (or of a cancelled reservation) to the pool."""
        self.pool.free(list(reversed(block_ids)))

    def reserve_prefilled(
        self, request_id: str, prompt_token_ids: Seq[int], first_token_id: int, params: SamplingParams
    ) -> KVReservation:
        """Allocate blocks for a prompt computed elsewhere, reusing this worker's cached prefix.

        first_token_id is the token the prefilling worker sampled; decoding continues after it.
        Raises InvalidRequestError when the request can't be served and NoFreeBlocksError when
        the cache is too full now; either way nothing changes."""
        self.overlapped.wait_device()  # the blocks it hands out may have been freed mid-step
        self._check_new_request(request_id, params)
        token_ids = self._tokenize(request_id, list(prompt_token_ids))
        if not (isinstance(first_token_id, int) and 0 <= first_token_id < self.vocab_size):
            raise InvalidRequestError(f"first token id must be in [0, {self.vocab_size})", field="first_token_id", request_id=request_id)
        if params.max_tokens <= 1 or first_token_id in params.stop_token_ids or (
            not params.ignore_eos and first_token_id in self.eos_token_ids
        ):
            raise InvalidRequestError("the first token already finished this request", field="first_token_id", request_id=request_id)
        if request_id in self._receiving:
            raise InvalidRequestError("duplicate request id", field="request_id", request_id=request_id)
        seq = Sequence(request_id, token_ids, params)
        seq.token_ids.append(first_token_id)
        blocks = self.scheduler.blocks
        cached = blocks.cached_prefix(seq)  # every full prompt block may hit: none is recomputed
        if not blocks.admit(seq, cached, len(token_ids) - len(cached) * self.pool.block_size):
            raise NoFreeBlocksError(blocks_for_tokens(len(token_ids), self.pool.block_size), self.pool.num_free_blocks)
        seq.num_cached_prompt_tokens = seq.num_computed_tokens
        self._receiving[request_id] = _Request(seq, None, None)
        return KVReservation(tuple(seq.block_ids), len(cached))

    def commit_prefilled(self, request_id: str) -> None:
        """The reserved blocks now hold the prompt's KV: cache them and decode from the next step."""
        seq = self._receiving.pop(request_id).seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.scheduler.blocks.register_full_blocks(seq)
        request = self._new_request(seq)
        if request.detokenizer is not None:
            request.detokenizer.push(seq.token_ids[-1])  # its text went out with the prefill's answer
        if request.generator is not None:
            # The prefilling worker drew one uniform for the first token: skip it, so that a seeded
            # request samples the same tokens as it would on one worker.
            torch.empty(1, device=self.device).uniform_(generator=request.generator)
        self.requests[request_id] = request
        self.scheduler.add_running(seq)

    def cancel_prefilled(self, request_id: str, *, free_blocks: bool = True) -> tuple[int, ...]:
        """Drop a reservation. With free_blocks=False the caller keeps the blocks (a transfer may
        still write into them) and frees them later with release_blocks; they are returned."""
        seq = self._receiving.pop(request_id).seq
        block_ids = tuple(seq.block_ids)
        if free_blocks:
            self.scheduler.blocks.free(seq)
            return ()
        seq.block_ids = []
        return block_ids

    def _check_new_request(self, request_id: str, params: SamplingParams) -> None:
        if request_id in self.requests or request_id in self._receiving:
            raise InvalidRequestError("duplicate request id", field="request_id", request_id=request_id)
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams", field="params", request_id=request_id)

    def _new_request(self, seq: Sequence) -> _Request:
        params = seq.params
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, stop=params.stop, skip_special_tokens=params.skip_special_tokens
            )
        generator = None if params.greedy else make_generator(params.seed, self.device)
        return _Request(seq, detokenizer, generator)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its final output comes from the next step()."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, FinishReason.ABORT, "")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished_outputs) or self.overlapped.in_flight

    def _tokenize(self, request_id: str, prompt: str | Seq[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids", field="prompt", request_id=request_id)
            token_ids = tuple(self.tokenizer(prompt)["input_ids"]) if prompt else ()
        else:
            token_ids = tuple(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in token_ids):
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {self.vocab_size})", field="prompt", request_id=request_id
                )
        if not token_ids:
            raise InvalidRequestError("prompt is empty", field="prompt", request_id=request_id)
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; this model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate",
                field="prompt",
                request_id=request_id,
            )
        return token_ids

    # -- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that changed. Overlapped
        (workers/overlapped_step.py), these are the outputs of the step the last call launched."""
        outputs = self._drain_finished()  # aborts since the last step
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        scheduled_at = time.perf_counter()
        for chunk in plan.chunks:
            if chunk.seq.queue_seconds is None:
                chunk.seq.queue_seconds = scheduled_at - chunk.seq.arrival_time
        sampled = [self.requests[c.seq.request_id] for c in plan.chunks if c.completes_sequence]
        if plan.chunks and self.overlapped.can_launch([r.seq.params for r in sampled], any(r.hand_off_kv for r in sampled)):
            return outputs + self._step_overlapped(plan.chunks, sampled)
        outputs += self._append_tokens([(seq, t, None) for seq, t in self.overlapped.drain()])  # all on the host
        chunks = [c for c in plan.chunks if not c.seq.is_finished]  # the drained step may have ended some
        if not chunks:
            return outputs + self._drain_finished()
        sampling = [c for c in chunks if c.completes_sequence]
        try:
            logits = self.runner.execute(chunks)
        except Exception as e:
            self._abort_failed_step([c.seq for c in chunks])
            if isinstance(e, TensorParallelError):
                raise  # the group is gone: no later step can run either
            return outputs + self._drain_finished()
        for chunk in chunks:
            self.num_prompt_tokens_computed += self.scheduler.account_computed(chunk)
        if sampling:
            outputs.extend(self._sample_and_append(sampling, logits))
        return outputs + self._drain_finished()

    def _step_overlapped(self, chunks: Seq[ScheduledChunk], sampled: list[_Request]) -> list[RequestOutput]:
        """Launch this step on the device, then finish the one the last call launched."""
        # No row here penalizes (can_launch), so the sampler reads no token history.
        rows = [SamplingInput(r.seq.params, r.seq.prompt_token_ids, (), r.generator) for r in sampled]
        try:
            previous = self.overlapped.launch(chunks, [r.seq for r in sampled], rows)
        except Exception:
            self._abort_failed_step([c.seq for c in chunks] + self.overlapped.discard())
            return self._drain_finished()
        outputs = self._append_tokens([(seq, t, None) for seq, t in self.overlapped.resolve(previous)])
        for chunk in chunks:
            if not chunk.seq.is_finished:  # a sequence its resolved token ended: this row is dropped
                self.num_prompt_tokens_computed += self.scheduler.account_computed(chunk)  # no hash covers a placeholder now
        self.overlapped.hold()
        return outputs + self._drain_finished()

    def _abort_failed_step(self, seqs: list[Sequence]) -> None:
        live = {seq.request_id: seq for seq in seqs if not seq.is_finished}  # a seq may be in two steps
        logger.exception("model step failed; aborting the %d requests in it", len(live))
        for request_id in live:
            self._finish(self.requests[request_id], FinishReason.ABORT, "")

    def _sample_and_append(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[RequestOutput]:
        requests = [self.requests[c.seq.request_id] for c in chunks]
        rows = [SamplingInput(r.seq.params, r.seq.prompt_token_ids, r.seq.output_token_ids, r.generator) for r in requests]
        sampled = self.sampler(logits, rows)
        return self._append_tokens(list(zip([c.seq for c in chunks], sampled.token_ids, sampled.logprobs)))

    def _append_tokens(self, tokens: Seq[tuple[Sequence, int, TokenLogprobs | None]]) -> list[RequestOutput]:
        outputs = [self._append_token(self.requests[seq.request_id], token_id, lp) for seq, token_id, lp in tokens]
        return [output for output in outputs if output is not None]

    def _append_token(self, request: _Request, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput | None:
        seq = request.seq
        params = seq.params
        seq.token_ids.append(token_id)
        if logprobs is not None:
            request.pending_logprobs.append(logprobs)
        is_stop_token = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        text = ""
        if request.detokenizer is not None and not is_stop_token:
            text = request.detokenizer.push(token_id)
        if is_stop_token or (request.detokenizer is not None and request.detokenizer.stopped):
            self._finish(request, FinishReason.STOP, text)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(request, FinishReason.LENGTH, text)
        elif request.hand_off_kv:
            self._hand_off(request, text)
        else:
            return self._output(request, (token_id,), text, None)
        return None

    def _finish(self, request: _Request, reason: FinishReason, text: str) -> None:
        """Free the request's blocks at once and queue its last output for the caller."""
        seq = request.seq
        if seq.token_ids[-1] == PLACEHOLDER_TOKEN_ID:  # aborted with a token in flight: end before it
            seq.token_ids.pop()
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        del self.requests[seq.request_id]
        if request.detokenizer is not None and reason is not FinishReason.ABORT:
            text += request.detokenizer.finish()
        new_tokens = (seq.token_ids[-1],) if reason is not FinishReason.ABORT and seq.num_output_tokens else ()
        self._finished_outputs.append(self._output(request, new_tokens, text, reason))

    def _hand_off(self, request: _Request, text: str) -> None:
        """Let go of a request after its first token, keeping its blocks for the caller."""
        seq = request.seq
        self.scheduler.detach(seq)
        del self.requests[seq.request_id]
        held = HeldKV(tuple(seq.block_ids), seq.num_computed_tokens)
        seq.block_ids = []
        output = self._output(request, (seq.token_ids[-1],), text, None)
        self._finished_outputs.append(dataclasses.replace(output, held_kv=held))

    def _drain_finished(self) -> list[RequestOutput]:
        outputs, self._finished_outputs = self._finished_outputs, []
        return outputs

    def _output(
        self, request: _Request, new_tokens: tuple[int, ...], text: str, reason: FinishReason | None
    ) -> RequestOutput:
        seq = request.seq
        logprobs, request.pending_logprobs = tuple(request.pending_logprobs), []
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_text=text,
            new_logprobs=logprobs,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            queue_seconds=seq.queue_seconds,
        )
