"""The orchestrator's side of the worker API: async gRPC calls to one worker, with deadlines.

No torch and no engine types: requests go out as token ids and a plain dict of sampling
parameters (the field names of the worker's SamplingParams), answers come back as small
dataclasses, and every failure is a WorkerCallError that says whether the request may be
retried elsewhere (the worker sends that in the `tandem-retriable` trailer).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc
from tandem.workers.cluster_auth import ClusterAuth

MODEL_INFO_MAX_MESSAGE_BYTES = 64 << 20

RETRIABLE_KEY = "tandem-retriable"  # set by workers/server.py
_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
_RETRIABLE_WITHOUT_TRAILER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class WorkerCallError(Exception):
    """A call to a worker failed; ``code`` is the gRPC status name. ``unreachable``: the worker
    itself did not answer (its process is gone or its channel is down), as opposed to a worker
    that answered with an error, which always sends the retriable trailer."""

    def __init__(
        self, address: str, call: str, code: str, message: str, retriable: bool, *, unreachable: bool = False
    ) -> None:
        super().__init__(f"{call} on {address} failed: {code}: {message}")
        self.address = address
        self.code = code
        self.message = message
        self.retriable = retriable
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class PrefillReply:
    first_token_id: int | None
    first_text: str
    first_logprob: pb.TokenLogprob | None
    finish_reason: str | None  # set when the first token ended the request (then no handle)
    handle: pb.KVHandle | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_seconds: float = 0.0  # waited on the worker before its first step


@dataclass(frozen=True, slots=True)
class GenerateDelta:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[pb.TokenLogprob, ...]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    transfer: pb.TransferReport | None  # on the first delta of a request whose KV was fetched


def sampling_params_to_proto(params: Mapping[str, Any]) -> pb.SamplingParams:
    """A dict with SamplingParams' field names -> the wire message (None means unset)."""
    fields = {key: value for key, value in params.items() if value is not None}
    if "seed" in fields:  # torch reads a negative seed as its two's complement; the wire's uint64 needs that form
        fields["seed"] %= 2**64
    for key in ("stop", "stop_token_ids"):
        if key in fields:
            fields[key] = list(fields[key])
    return pb.SamplingParams(**fields)


class WorkerClient:
    """One worker, one channel. ``timeout_s`` bounds unary calls; a stream's deadline is given
    per call."""

    def __init__(self, address: str, *, timeout_s: float = 30.0, auth: ClusterAuth = ClusterAuth()) -> None:
        self.address = address
        self.timeout_s = timeout_s
        # GetModelInfo carries the tokenizer files (9 MB for Llama 3), over gRPC's 4 MiB default.
        options = [("grpc.max_receive_message_length", MODEL_INFO_MAX_MESSAGE_BYTES)]
        self._channel = auth.channel(address, options)  # the cluster token and TLS, when the cluster has them
        self._stub = tandem_pb2_grpc.WorkerStub(self._channel)

    async def prefill(
        self, request_id: str, prompt_token_ids: Sequence[int], params: Mapping[str, Any], timeout_s: float | None = None
    ) -> PrefillReply:
        request = pb.PrefillRequest(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=sampling_params_to_proto(params)
        )
        reply = await self._unary("Prefill", self._stub.Prefill, request, timeout_s)
        return PrefillReply(
            first_token_id=None if reply.finish_reason == pb.FINISH_REASON_ABORT else reply.first_token_id,
            first_text=reply.first_text,
            first_logprob=reply.first_logprob if reply.HasField("first_logprob") else None,
            finish_reason=_FINISH_REASONS.get(reply.finish_reason),
            handle=reply.kv_handle if reply.HasField("kv_handle") else None,
            num_prompt_tokens=reply.num_prompt_tokens,
            num_cached_tokens=reply.num_cached_tokens,
            queue_seconds=reply.queue_seconds,
        )

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: Mapping[str, Any],
        *,
        handle: pb.KVHandle | None = None,
        first_token_id: int | None = None,
        timeout_s: float,
    ) -> AsyncIterator[GenerateDelta]:
        """Stream the request's tokens; with a handle, the worker fetches the prompt's KV first."""
        request = pb.GenerateRequest(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=sampling_params_to_proto(params)
        )
        if handle is not None:
            request.kv_handle.CopyFrom(handle)
        if first_token_id is not None:
            request.first_token_id = first_token_id
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            async for chunk in call:
                yield GenerateDelta(
                    token_ids=tuple(chunk.token_ids),
                    text=chunk.text,
                    logprobs=tuple(chunk.logprobs),
                    finish_reason=_FINISH_REASONS.get(chunk.finish_reason),
                    num_prompt_tokens=chunk.num_prompt_tokens,
                    num_cached_tokens=chunk.num_cached_tokens,
                    num_output_tokens=chunk.num_output_tokens,
                    transfer=chunk.transfer if chunk.HasField("transfer") else None,
                )
        except grpc.aio.AioRpcError as error:
            raise self._error("Generate", error) from None
        finally:
            call.cancel()  # a caller that stops early cancels the stream; the worker aborts the request

    async def release(self, handle: pb.KVHandle) -> bool:
        return (await self._unary("Release", self._stub.Release, pb.ReleaseRequest(handle=handle), None)).released

    async def abort(self, request_id: str) -> bool:
        return (await self._unary("Abort", self._stub.Abort, pb.AbortRequest(request_id=request_id), None)).found

    async def drain(self) -> int:
        """Stop the worker taking work and wait (up to ``timeout_s``) until it runs no request and
        holds no lease; returns how many requests were in flight when it began."""
        return (await self._unary("Drain", self._stub.Drain, pb.DrainRequest(), None)).num_requests_finished

    async def stats(self) -> pb.StatsResponse:
        return await self._unary("Stats", self._stub.Stats, pb.StatsRequest(), None)

    async def model_info(self) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", self._stub.GetModelInfo, pb.ModelInfoRequest(), None)

    async def transfer_metadata(self) -> pb.TransferMetadata:
        return await self._unary("GetTransferMetadata", self._stub.GetTransferMetadata, pb.TransferMetadataRequest(), None)

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, name: str, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._error(name, error) from None

    def _error(self, call: str, error: grpc.aio.AioRpcError) -> WorkerCallError:
        trailer = dict(error.trailing_metadata() or ()).get(RETRIABLE_KEY)
        retriable = trailer == "true" if trailer is not None else error.code() in _RETRIABLE_WITHOUT_TRAILER
        unreachable = trailer is None and error.code() is grpc.StatusCode.UNAVAILABLE
        return WorkerCallError(self.address, call, error.code().name, error.details() or "", retriable,
                               unreachable=unreachable)
