"""Conversions between the worker API's protobuf messages and the engine's Python types.

The only module of the worker that knows both sides; the server and the peer client call it, the
engine and the worker logic never see a protobuf message.
"""
from __future__ import annotations

import math

from tandem.kvtransfer.leases import KVHandle, TransferMode
from tandem.proto import tandem_pb2 as pb
from tandem.workers.engine import RequestOutput
from tandem.workers.errors import InvalidRequestError
from tandem.workers.sampler import TokenLogprobs
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.sequence import FinishReason

_FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_MODE_TO_PROTO = {TransferMode.READ: pb.TRANSFER_MODE_READ, TransferMode.PUSH: pb.TRANSFER_MODE_PUSH}
_MODE_FROM_PROTO = {v: k for k, v in _MODE_TO_PROTO.items()}


def sampling_params_from_proto(params: pb.SamplingParams, request_id: str) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p or 1.0,
            top_k=params.top_k,
            min_p=params.min_p,
            seed=params.seed if params.HasField("seed") else None,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty or 1.0,
            stop=tuple(params.stop),
            stop_token_ids=tuple(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs if params.HasField("logprobs") else None,
            skip_special_tokens=params.skip_special_tokens if params.HasField("skip_special_tokens") else True,
        )
    except InvalidRequestError as error:
        raise InvalidRequestError(str(error), field=error.field, request_id=request_id) from None


def handle_to_proto(handle: KVHandle) -> pb.KVHandle:
    return pb.KVHandle(
        handle_id=handle.handle_id,
        worker_id=handle.worker_id,
        epoch=handle.epoch,
        agent_name=handle.agent_name,
        address=handle.address,
        block_ids=list(handle.block_ids),
        num_tokens=handle.num_tokens,
        lease_deadline_unix=handle.lease_deadline,
        mode=_MODE_TO_PROTO[handle.mode],
        staging_offset=handle.staging_offset,
    )


def handle_from_proto(message: pb.KVHandle) -> KVHandle:
    if not (message.handle_id and message.worker_id and message.address):
        raise InvalidRequestError("kv_handle needs handle_id, worker_id and address", field="kv_handle")
    if not math.isfinite(message.lease_deadline_unix):  # NaN would compare as "not yet" forever
        raise InvalidRequestError("kv_handle lease_deadline_unix must be a finite time", field="kv_handle")
    mode = _MODE_FROM_PROTO.get(message.mode)
    if mode is None:  # a newer peer's mode: reading as if it were READ could read the wrong bytes
        raise InvalidRequestError(f"kv_handle transfer mode {message.mode} is unknown here", field="kv_handle")
    return KVHandle(
        handle_id=message.handle_id,
        worker_id=message.worker_id,
        epoch=message.epoch,
        agent_name=message.agent_name,
        address=message.address,
        block_ids=tuple(message.block_ids),
        num_tokens=message.num_tokens,
        lease_deadline=message.lease_deadline_unix,
        mode=mode,
        staging_offset=message.staging_offset if message.HasField("staging_offset") else None,
    )


def logprob_to_proto(logprobs: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        logprob=logprobs.logprob, top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprobs.top]
    )


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return _FINISH_TO_PROTO[reason]


def output_to_chunk(output: RequestOutput) -> pb.GenerateChunk:
    return pb.GenerateChunk(
        request_id=output.request_id,
        token_ids=list(output.new_token_ids),
        text=output.new_text,
        logprobs=[logprob_to_proto(lp) for lp in output.new_logprobs],
        finish_reason=finish_reason_to_proto(output.finish_reason),
        num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens,
        num_output_tokens=output.num_output_tokens,
    )
