"""The asyncio gRPC server of one worker: tandem.proto's Worker service over a Worker.

Translation only: messages in, Worker calls, messages out, and one place that turns every
exception into a precise gRPC status. A malformed request gets INVALID_ARGUMENT and the worker
keeps serving; an unexpected exception gets INTERNAL and is logged with its traceback.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc

from tandem.kvtransfer.block_pool import NoFreeBlocksError
from tandem.kvtransfer.leases import HandleMismatchError, StaleHandleError, UnknownHandleError
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc
from tandem.workers.errors import InvalidRequestError, WorkerError
from tandem.workers.pairing import KV_LAYOUT
from tandem.workers.wire import (
    finish_reason_to_proto,
    handle_from_proto,
    handle_to_proto,
    logprob_to_proto,
    output_to_chunk,
    sampling_params_from_proto,
)
from tandem.workers.worker import API_VERSION, Worker
from tandem.workers.worker_types import ModelInfo, PrefillResult, Role

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ROLE_TO_PROTO = {Role.CONTEXT: pb.ROLE_CONTEXT, Role.GENERATION: pb.ROLE_GENERATION, Role.AGGREGATED: pb.ROLE_AGGREGATED}


def status_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, (InvalidRequestError, HandleMismatchError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, WorkerError):
        return grpc.StatusCode[error.status]
    if isinstance(error, StaleHandleError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, UnknownHandleError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, NoFreeBlocksError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


RETRIABLE_KEY = "tandem-retriable"  # trailing metadata: may the same request succeed on another worker?


async def _fail(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    """Answer with error's status and whether a router may retry it elsewhere; context.abort
    raises, ending the RPC."""
    code = status_of(error)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("internal error serving a request")
    retriable = getattr(error, "retriable", False) or code is grpc.StatusCode.RESOURCE_EXHAUSTED
    await context.abort(code, str(error), trailing_metadata=((RETRIABLE_KEY, "true" if retriable else "false"),))
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers honest


async def _answer(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    """Run a unary call's work, turning any exception into its precise gRPC status."""
    try:
        return await call()
    except Exception as error:
        await _fail(context, error)


def _request_id(request_id: str) -> str:
    if not request_id:
        raise InvalidRequestError("request_id is required", field="request_id")
    return request_id


class WorkerService(tandem_pb2_grpc.WorkerServicer):
    def __init__(self, worker: Worker, kv_events: tuple[str, str, str], num_refused: Callable[[], int] = lambda: 0) -> None:
        self.worker = worker
        self.kv_events = kv_events  # (endpoint, replay endpoint, topic)
        self.num_refused = num_refused  # calls the cluster-token check turned away

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        result = await _answer(context, lambda: self._prefill(request))
        output = result.output
        reply = pb.PrefillResponse(
            request_id=output.request_id,
            first_text=output.new_text,
            finish_reason=finish_reason_to_proto(output.finish_reason),
            num_prompt_tokens=output.num_prompt_tokens,
            num_cached_tokens=output.num_cached_tokens,
            queue_seconds=output.queue_seconds or 0.0,
        )
        if output.new_token_ids:
            reply.first_token_id = output.new_token_ids[0]
        if output.new_logprobs:
            reply.first_logprob.CopyFrom(logprob_to_proto(output.new_logprobs[0]))
        if result.handle is not None:
            reply.kv_handle.CopyFrom(handle_to_proto(result.handle))
        return reply

    async def _prefill(self, request: pb.PrefillRequest) -> PrefillResult:
        request_id = _request_id(request.request_id)
        params = sampling_params_from_proto(request.params, request_id)
        return await self.worker.prefill(request_id, list(request.prompt_token_ids), params)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            request_id = _request_id(request.request_id)
            params = sampling_params_from_proto(request.params, request_id)
            handle = handle_from_proto(request.kv_handle) if request.HasField("kv_handle") else None
            first = request.first_token_id if request.HasField("first_token_id") else None
            async for output, report in self.worker.generate(request_id, list(request.prompt_token_ids), params, handle, first):
                chunk = output_to_chunk(output)
                if report is not None:
                    chunk.transfer.CopyFrom(
                        pb.TransferReport(
                            num_blocks=report.num_blocks,
                            num_cached_blocks=report.num_cached_blocks,
                            num_bytes=report.stats.num_bytes,
                            num_descriptors=report.stats.num_descriptors,
                            seconds=report.stats.seconds,
                            local_block_ids=list(report.local_block_ids),
                        )
                    )
                yield chunk
        except Exception as error:
            await _fail(context, error)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        released = await _answer(context, lambda: self.worker.release(handle_from_proto(request.handle)))
        return pb.ReleaseResponse(released=released)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        found = await _answer(context, lambda: self.worker.abort(_request_id(request.request_id)))
        return pb.AbortResponse(found=found)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        return pb.DrainResponse(num_requests_finished=await self.worker.drain())

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        stats = dict(await self.worker.stats())
        stats["role"] = _ROLE_TO_PROTO[Role(stats["role"])]
        return pb.StatsResponse(**stats, num_unauthenticated=self.num_refused())

    async def GetTransferMetadata(
        self, request: pb.TransferMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransferMetadata:
        worker = self.worker
        meta = worker.transfer.metadata()
        pairing = worker.pairing
        endpoint, replay_endpoint, topic = self.kv_events
        return pb.TransferMetadata(
            api_version=API_VERSION,
            worker_id=worker.config.worker_id,
            epoch=worker.config.epoch,
            role=_ROLE_TO_PROTO[worker.config.role],
            agent_name=meta.agent_name,
            agent_metadata=meta.agent_metadata,
            base_address=meta.base_address,
            bytes_per_block=meta.bytes_per_block,
            num_blocks=meta.num_blocks,
            memory_type=meta.memory_type,
            device_id=meta.device_id,
            staging_address=meta.staging_address,
            staging_slots=meta.staging_slots,
            model=pairing.model,
            block_size=pairing.block_size,
            kv_dtype=pairing.kv_dtype,
            num_layers=pairing.num_layers,
            num_kv_heads=pairing.num_kv_heads,
            head_dim=pairing.head_dim,
            kv_layout=KV_LAYOUT,
            kv_events_endpoint=endpoint,
            kv_events_replay_endpoint=replay_endpoint,
            kv_events_topic=topic,
        )

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        info: ModelInfo = await _answer(context, self.worker.model_info)
        return pb.ModelInfo(
            api_version=API_VERSION,
            model=info.model,
            max_model_len=info.max_model_len,
            block_size=info.block_size,
            eos_token_ids=list(info.eos_token_ids),
            vocab_size=info.vocab_size,
            tokenizer_files=info.tokenizer_files,
        )
