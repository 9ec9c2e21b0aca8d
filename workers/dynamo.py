"""A Tandem worker as an NVIDIA Dynamo backend: ``tandem worker --role context --dynamo``.

Dynamo routes, Tandem moves the KV. The worker registers with Dynamo's runtime as a
token-in/token-out engine of its role (aggregated, prefill or decode, with the ``needs`` that
Dynamo requires of the last two), serves Dynamo's request dicts, and relays its vLLM-wire
KV-event stream onto Dynamo's event plane so that Dynamo's KV router routes by Tandem's cache.
The same ZMQ stream stays open for llm-d and Tandem's own orchestrator: the relay is a second
subscriber, not a second format. In the disaggregated path the prefill answer carries Tandem's
KV handle (workers/dynamo_requests.py) and the decode worker READs the blocks over NIXL, as it
does under Tandem's orchestrator.

The runtime is configured the way every Dynamo component is, from ``DYN_*`` environment variables
(discovery backend, request and event planes, hosts); see docs/dynamo.md. Dynamo is an optional
extra: without it Tandem works and ``--dynamo`` says how to install it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from tandem.workers.dynamo_requests import (
    chunk_of,
    hand_off_of,
    hand_off_params,
    prompt_of,
    sampling_params_of,
    usage,
)
from tandem.workers.errors import InvalidRequestError, WorkerError
from tandem.workers.worker import Worker
from tandem.workers.worker_types import Role

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tandem-serve[dynamo]'  (NVIDIA Dynamo's runtime, ai-dynamo-runtime==1.6.1)"
METRICS_INTERVAL_S = 0.5  # how often the router hears this worker's KV load
_COMPONENTS = {Role.AGGREGATED: "tandem", Role.GENERATION: "tandem", Role.CONTEXT: "tandem-prefill"}
T = TypeVar("T")


class DynamoUnavailableError(RuntimeError):
    """``--dynamo`` without Dynamo's runtime installed."""


def import_dynamo() -> tuple[Any, Any]:
    """(dynamo.llm, dynamo.runtime), or an error that says how to get them."""
    try:
        import dynamo.llm as llm
        import dynamo.runtime as runtime
    except ImportError as error:
        raise DynamoUnavailableError(f"--dynamo needs NVIDIA Dynamo's runtime: {INSTALL_HINT}") from error
    return llm, runtime


class DynamoBackend:
    """One worker's presence in Dynamo: its endpoint, model card, KV-event relay and load metrics."""

    def __init__(self, worker: Worker, kv_events_endpoint: str, *, namespace: str = "dynamo",
                 model_name: str | None = None) -> None:
        self.worker = worker
        self.kv_events_endpoint = kv_events_endpoint
        self.namespace = namespace
        self.model_name = model_name or worker.config.model
        self.endpoint_path = f"{namespace}.{_COMPONENTS[worker.config.role]}.generate"
        self._tasks: list[asyncio.Task] = []
        self._runtime: Any = None
        self._llm: Any = None
        self._relay: Any = None

    async def start(self) -> None:
        """Register and start serving; everything started is undone if a later step fails."""
        llm, runtime_module = import_dynamo()
        self._llm = llm
        loop = asyncio.get_running_loop()
        self._runtime = runtime_module.DistributedRuntime(
            loop, os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"), os.environ.get("DYN_REQUEST_PLANE", "tcp"))
        try:
            endpoint = self._runtime.endpoint(self.endpoint_path)
            # Serve first: a model card must not be discoverable before its endpoint answers.
            self._tasks.append(asyncio.ensure_future(endpoint.serve_endpoint(self.generate)))
            block_size = self.worker.engine.pool.block_size
            self._relay = llm.KvEventPublisher(
                endpoint, kv_block_size=block_size, zmq_endpoint=self.kv_events_endpoint, zmq_topic="kv@",
                enable_local_indexer=True)  # a router that starts later still learns what is cached
            metrics = llm.WorkerMetricsPublisher()
            await metrics.create_endpoint(endpoint)
            self._tasks.append(asyncio.create_task(self._publish_load(metrics), name="dynamo-metrics"))
            await self._register(llm, endpoint, block_size)
        except BaseException:
            await self.stop()
            raise
        logger.info("registered with Dynamo as %s (%s, model %s)", self.endpoint_path,
                    self.worker.config.role.value, self.model_name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._relay is not None:
            self._relay.shutdown()
            self._relay = None
        if self._runtime is not None:
            self._runtime.shutdown()
            self._runtime = None

    async def _register(self, llm: Any, endpoint: Any, block_size: int) -> None:
        engine = self.worker.engine
        config = llm.ModelRuntimeConfig()
        config.total_kv_blocks = engine.pool.num_blocks
        config.max_num_seqs = engine.scheduler.config.max_num_seqs
        config.max_num_batched_tokens = engine.scheduler.config.max_num_batched_tokens
        config.context_length = engine.max_model_len
        role = self.worker.config.role
        if role is Role.CONTEXT:
            model_type, worker_type, needs = llm.ModelType.Prefill, llm.WorkerType.Prefill, [[llm.WorkerType.Decode]]
        else:
            model_type = llm.ModelType.Chat | llm.ModelType.Completions
            worker_type = llm.WorkerType.Decode if role is Role.GENERATION else llm.WorkerType.Aggregated
            needs = [[llm.WorkerType.Prefill]] if role is Role.GENERATION else None
        card = await self.worker.loop.call(lambda: _write_model_card(engine))
        await llm.register_model(
            llm.ModelInput.Tokens, model_type, endpoint, str(card), self.model_name,
            worker_type=worker_type, needs=needs, kv_cache_block_size=block_size, runtime_config=config)

    async def _publish_load(self, metrics: Any) -> None:
        while True:
            stats = await self.worker.stats()
            used = int(stats["num_total_blocks"]) - int(stats["num_free_blocks"])
            metrics.publish(kv_used_blocks=used, active_decode_blocks=used)
            await asyncio.sleep(METRICS_INTERVAL_S)

    # -- requests -----------------------------------------------------------------------------

    async def generate(self, request: dict[str, Any], context: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Dynamo's handler: delta chunks until one carries a finish_reason. Bad input becomes an
        HTTP 400 with our message at the frontend (Dynamo's HttpError would lose the message); a
        worker-side refusal (draining, a peer gone) says the worker is unavailable."""
        request_id = (context.id() if context is not None else None) or uuid.uuid4().hex
        try:
            if self.worker.config.role is Role.CONTEXT:
                yield await _until_stopped(self._prefill(request_id, request), context)
                return
            async for chunk in self._decode(request_id, request, context):
                yield chunk
        except InvalidRequestError as error:
            raise self._llm.exceptions.InvalidArgument(str(error)) from error  # a 400 that keeps its message
        except WorkerError as error:
            raise self._llm.exceptions.WorkerUnavailable(str(error)) from error

    async def _prefill(self, request_id: str, request: dict[str, Any]) -> dict[str, Any]:
        prompt = prompt_of(request)
        params = sampling_params_of(request, self._max_new_tokens(prompt))
        # The frontend sends max_tokens=1; 2 makes the engine hand the KV off after the first token
        # instead of finishing the request (the decode worker has the real limit).
        params = dataclasses.replace(params, max_tokens=2)
        result = await self.worker.prefill(request_id, prompt, params)
        output = result.output
        return {"token_ids": list(output.new_token_ids), "finish_reason": "length",
                "completion_usage": usage(output.num_prompt_tokens, len(output.new_token_ids)),
                "disaggregated_params": hand_off_params(output, result.handle)}

    async def _decode(self, request_id: str, request: dict[str, Any], context: Any) -> AsyncIterator[dict[str, Any]]:
        prompt = prompt_of(request)
        params = sampling_params_of(request, self._max_new_tokens(prompt))
        hand_off = hand_off_of(request)
        if hand_off is not None and (hand_off.handle is None or params.max_tokens <= 1):
            # The prefill's first token already ended the request: there is nothing to READ.
            if hand_off.handle is not None:
                await self._release_remote(hand_off.handle)
            yield {"token_ids": [hand_off.first_token_id], "finish_reason": hand_off.finish_reason or "length",
                   "completion_usage": usage(len(prompt), 1)}
            return
        handle, first = (hand_off.handle, hand_off.first_token_id) if hand_off else (None, None)
        outputs = self.worker.generate(request_id, prompt, params, handle, first)
        try:
            while True:
                try:
                    output, _report = await _until_stopped(anext(outputs), context)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if context is not None and (context.is_stopped() or context.is_killed()):
                        yield {"token_ids": [], "finish_reason": "cancelled"}
                        return
                    raise
                yield chunk_of(output, first_token_id=first)
                first = None
        finally:
            await outputs.aclose()  # a request left early is aborted on the engine

    async def _release_remote(self, handle: Any) -> None:
        try:
            await self.worker.peers.release(handle, self.worker.config.peer_timeout_s)
        except Exception as error:  # its lease ends on its own; this request is fine
            logger.warning("could not release KV handle %s (its lease will expire): %s", handle.handle_id, error)

    def _max_new_tokens(self, prompt: list[int]) -> int:
        return max(1, self.worker.engine.max_model_len - len(prompt))


async def _until_stopped(step: Awaitable[T], context: Any) -> T:
    """Await one step, or raise CancelledError as soon as Dynamo stops or kills the request (a
    client that went away), so that a long prefill or decode wait is not sat out for nobody."""
    if context is None:
        return await step
    work = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(context.async_killed_or_stopped())
    try:
        await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await work
        raise asyncio.CancelledError
    return work.result()


def _write_model_card(engine: Any) -> Path:
    """The files Dynamo's frontend reads to tokenize and template for this model (the HF config and
    the tokenizer as save_pretrained writes them; no weights), in a folder named by their hash.

    Dynamo checks that every worker of a model registers the same card, paths included, and
    turns away the ones that differ; equal files must therefore land at one path, on every host.
    """
    if engine.tokenizer is None:
        raise InvalidRequestError("a model served through Dynamo needs a tokenizer; this checkpoint has none")
    draft = Path(tempfile.mkdtemp(prefix="tandem-dynamo-card-draft-"))
    config = engine.hf_config
    if not config.architectures:  # a config built from GGUF metadata; Dynamo's card requires the field
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.to_json_file(draft / "config.json")
    engine.tokenizer.save_pretrained(draft)
    digest = hashlib.sha256()
    for path in sorted(draft.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    folder = Path(tempfile.gettempdir()) / f"tandem-dynamo-card-{digest.hexdigest()[:16]}"
    try:
        draft.rename(folder)  # atomic: a worker beside us either finds the whole card or none
    except OSError:  # already there, from an earlier worker of the same model
        shutil.rmtree(draft, ignore_errors=True)
    return folder
