"""One request through the cluster: route, prefill on a context worker, hand the KV off, decode
on a generation worker, and stream the tokens back; retry on another worker when one fails.

The first token goes to the caller as soon as the context worker returns it: time to first
token does not wait for the KV transfer. A retriable failure (a worker died, a transfer failed,
a lease ran out) is retried up to `max_retries` times from the prompt plus the tokens already
streamed, so the caller sees one stream. Closing the stream early (a client that went away)
cancels the worker calls, and the workers abort the request and free its blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tandem.orchestrator.cluster import Cluster
from tandem.orchestrator.router import Route, Router
from tandem.orchestrator.worker_client import GenerateDelta, PrefillReply, WorkerCallError

logger = logging.getLogger(__name__)

# Errors of a Generate call with a handle that say nothing about the KV transfer path.
# DEADLINE_EXCEEDED is the orchestrator's own request deadline (a busy worker); a READ that times
# out on the worker comes back as UNAVAILABLE.
_NOT_TRANSFER_FAILURES = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED"})


@dataclass(slots=True)
class Waterfall:
    """Where a request's time to first token went, and what its KV hand-off moved.

    Disaggregated, the first token comes from the context worker (queue, then prefill); the KV
    READ and the first decode step come before the second token. Prefilled locally on the
    generation worker, only the first decode step (first to second token) is split out.
    """

    route: Route | None = None
    attempts: int = 0
    queue_s: float = 0.0  # waiting on the context worker before its first step
    prefill_s: float = 0.0  # the Prefill call, queue included
    first_token_s: float = 0.0  # from the first route to the first token
    transfer_s: float = 0.0
    transfer_bytes: int = 0
    first_decode_s: float = 0.0  # first to second token, less the KV transfer
    retries: list[str] = field(default_factory=list)  # why each retry happened


class Pipeline:
    def __init__(self, cluster: Cluster, router: Router, *, max_retries: int = 1, request_timeout_s: float = 600.0) -> None:
        self.cluster = cluster
        self.router = router
        self.max_retries = max_retries
        self.request_timeout_s = request_timeout_s
        self._background: set[asyncio.Future] = set()

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: Mapping[str, Any], waterfall: Waterfall | None = None
    ) -> AsyncIterator[GenerateDelta]:
        """Yield the request's deltas; raises WorkerCallError when it cannot finish. The request
        timeout bounds the whole request, retries included, not each worker call."""
        waterfall = waterfall or Waterfall()
        emitted: list[int] = []
        start = time.perf_counter()
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            waterfall.attempts += 1
            attempt_id = request_id if waterfall.attempts == 1 else f"{request_id}.retry{waterfall.attempts - 1}"
            already = len(emitted)  # a retry's prompt ends with them; its counts start after them
            attempt_params = dict(params, max_tokens=params["max_tokens"] - already)
            try:
                async for delta in self._attempt(attempt_id, [*prompt_ids, *emitted], attempt_params, waterfall, deadline):
                    if delta.token_ids and len(emitted) <= 1:
                        _time_first_tokens(waterfall, len(emitted), time.perf_counter() - start)
                    if already:
                        delta = replace(
                            delta, num_prompt_tokens=len(prompt_ids), num_output_tokens=already + delta.num_output_tokens
                        )
                    emitted.extend(delta.token_ids)
                    yield delta
                return
            except WorkerCallError as error:
                if not error.retriable or waterfall.attempts > self.max_retries or time.monotonic() >= deadline:
                    raise
                waterfall.retries.append(f"{error.code}: {error.message}")
                logger.warning("request %s: %s; retrying with %d tokens already streamed", request_id, error, len(emitted))

    async def _attempt(
        self, request_id: str, prompt: list[int], params: dict[str, Any], waterfall: Waterfall, deadline: float
    ) -> AsyncIterator[GenerateDelta]:
        def time_left() -> float:
            return max(deadline - time.monotonic(), 0.001)

        loads = self.cluster.loads()
        if self.cluster.transfer_status() == "failing":  # every hand-off fails: prefill locally
            loads = [load for load in loads if load.role != "context"]
        route = self.router.route(len(prompt), self.cluster.cached_blocks(prompt), loads, self.cluster.block_size)
        waterfall.route = route
        generation = self.cluster.client(route.generation_worker)
        if route.context_worker is None:
            with self._noting_failures(route.generation_worker):
                async for delta in generation.generate(request_id, prompt, params, timeout_s=time_left()):
                    yield delta
            return
        context = self.cluster.client(route.context_worker)
        started = time.perf_counter()
        with self._noting_failures(route.context_worker):
            with self.cluster.prefill_in_flight(route.context_worker, len(prompt) - route.cached_tokens_on_context):
                reply = await context.prefill(request_id, prompt, params, timeout_s=time_left())
        waterfall.prefill_s = time.perf_counter() - started
        waterfall.queue_s = reply.queue_seconds
        paths = self.cluster.transfer_paths
        streamed = False
        try:
            yield _first_delta(reply)  # a caller may stop here: the finally below releases the handle
            if reply.handle is None:  # the first token finished the request (or it was aborted)
                return
            with self._noting_failures(route.generation_worker):
                async for delta in generation.generate(
                    request_id, prompt, params, handle=reply.handle, first_token_id=reply.first_token_id,
                    timeout_s=time_left(),
                ):
                    if delta.transfer is not None:
                        waterfall.transfer_s = delta.transfer.seconds
                        waterfall.transfer_bytes = delta.transfer.num_bytes
                        paths.record(route.context_worker, route.generation_worker, True,
                                     f"{delta.transfer.num_bytes} B in {delta.transfer.seconds * 1e3:.1f} ms")
                    streamed = True
                    yield delta
        except WorkerCallError as error:
            if not streamed and not error.unreachable and error.code not in _NOT_TRANSFER_FAILURES:
                paths.record(route.context_worker, route.generation_worker, False, f"{error.code}: {error.message}")
            raise
        finally:
            if not streamed and reply.handle is not None:  # the KV was never read: unpin it now, not at lease expiry
                self._in_background(context.release(reply.handle))

    @contextlib.contextmanager
    def _noting_failures(self, worker_id: str) -> Iterator[None]:
        """A worker that did not answer leaves routing at once, so the retry goes elsewhere."""
        try:
            yield
        except WorkerCallError as error:
            if error.unreachable:
                self.cluster.mark_unreachable(worker_id)
            raise

    def _in_background(self, call: Awaitable[object]) -> None:
        """Run a best-effort call to its end even when the request's task is being cancelled (a
        client that disconnected cancels it, and every await in its cleanup with it)."""
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._finish_background)

    def _finish_background(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background worker call failed: %s", task.exception())


def _time_first_tokens(waterfall: Waterfall, num_emitted: int, elapsed_s: float) -> None:
    """Stamp the first token's time, then the first decode step's (on the second token)."""
    if num_emitted == 0:
        waterfall.first_token_s = elapsed_s
    elif not waterfall.first_decode_s:
        waterfall.first_decode_s = max(0.0, elapsed_s - waterfall.first_token_s - waterfall.transfer_s)


def _first_delta(reply: PrefillReply) -> GenerateDelta:
    return GenerateDelta(
        token_ids=() if reply.first_token_id is None else (reply.first_token_id,),
        text=reply.first_text,
        logprobs=() if reply.first_logprob is None else (reply.first_logprob,),
        finish_reason=reply.finish_reason,
        num_prompt_tokens=reply.num_prompt_tokens,
        num_cached_tokens=reply.num_cached_tokens,
        num_output_tokens=0 if reply.first_token_id is None else 1,
        transfer=None,
    )
