"""Dynamo's token-in/token-out request and response dicts, translated to and from Tandem's.

Pure functions with no Dynamo import, so that the mapping is testable where the runtime wheel
is not installed. Dynamo's frontend tokenizes, applies the chat template, detokenizes and cuts
stop strings; a backend sees token ids only (``request["token_ids"]``) and answers with *delta*
chunks ``{"token_ids": [...], "finish_reason"?, "completion_usage"?}``.

In the disaggregated path the prefill worker's last chunk carries ``disaggregated_params``,
which the frontend hands to the decode worker as ``request["prefill_result"]``. Tandem puts
its KV handle there as the JSON form of the gRPC ``KVHandle`` message (proto/tandem.proto):
the same contract our own orchestrator uses, so the decode side validates it the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from tandem.kvtransfer.leases import KVHandle
from tandem.proto import tandem_pb2 as pb
from tandem.workers.engine import RequestOutput
from tandem.workers.errors import InvalidRequestError
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.sequence import FinishReason
from tandem.workers.wire import handle_from_proto, handle_to_proto

DISAGG_KEY = "tandem"  # our entry in disaggregated_params; other backends' keys are left alone

# sampling_options keys that map one to one onto SamplingParams fields
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty")
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "cancelled"}


@dataclass(frozen=True, slots=True)
class PrefillHandOff:
    """What a decode request learned from its prefill: the first token and, unless that token
    already ended the request, where the prompt's KV waits."""

    first_token_id: int
    handle: KVHandle | None
    finish_reason: str | None  # set when the prefill's first token finished the request


def prompt_of(request: Mapping[str, Any]) -> list[int]:
    token_ids = request.get("token_ids")
    if not isinstance(token_ids, list) or not token_ids or not all(isinstance(t, int) and t >= 0 for t in token_ids):
        raise InvalidRequestError("token_ids must be a non-empty list of token ids", field="token_ids")
    return token_ids


def sampling_params_of(request: Mapping[str, Any], default_max_tokens: int) -> SamplingParams:
    """SamplingParams for a Dynamo request. Nulls mean "not set": Tandem's defaults apply (greedy),
    and a missing max_tokens means "up to the context length" (default_max_tokens), as in vLLM."""
    stop = request.get("stop_conditions") or {}
    sampling = request.get("sampling_options") or {}
    output = request.get("output_options") or {}
    for name in ("n", "best_of"):
        if (sampling.get(name) or 1) != 1:
            raise InvalidRequestError(f"{name} > 1 is not supported", field=name)
    if sampling.get("use_beam_search"):
        raise InvalidRequestError("beam search is not supported", field="use_beam_search")
    if stop.get("min_tokens"):
        raise InvalidRequestError("min_tokens is not supported", field="min_tokens")
    if output.get("logprobs") is not None or output.get("prompt_logprobs") is not None:
        raise InvalidRequestError("logprobs are not served through Dynamo yet", field="logprobs")
    stop_token_ids = [*(stop.get("stop_token_ids_hidden") or []), *(stop.get("stop_token_ids_visible") or []),
                      *(stop.get("stop_token_ids") or [])]
    fields = {name: sampling[name] for name in _SAMPLING_FIELDS if sampling.get(name) is not None}
    return SamplingParams(
        max_tokens=stop.get("max_tokens") or default_max_tokens,
        stop=stop.get("stop") or (),
        stop_token_ids=stop_token_ids,
        ignore_eos=bool(stop.get("ignore_eos")),
        **fields,
    )


def chunk_of(output: RequestOutput, *, first_token_id: int | None = None) -> dict[str, Any]:
    """One delta chunk; the final one carries finish_reason and usage. first_token_id is put in
    front of the delta: a decode worker streams the token its prefill sampled."""
    token_ids = list(output.new_token_ids) if first_token_id is None else [first_token_id, *output.new_token_ids]
    chunk: dict[str, Any] = {"token_ids": token_ids}
    if output.finish_reason is not None:
        chunk["finish_reason"] = _FINISH[output.finish_reason]
        chunk["completion_usage"] = usage(output.num_prompt_tokens, output.num_output_tokens)
    return chunk


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def hand_off_params(output: RequestOutput, handle: KVHandle | None) -> dict[str, Any]:
    """The ``disaggregated_params`` a prefill worker answers with."""
    params: dict[str, Any] = {"first_token_id": output.new_token_ids[0]}
    if handle is not None:
        params["kv_handle"] = json_format.MessageToDict(handle_to_proto(handle))
    if output.finish_reason is not None:
        params["finish_reason"] = _FINISH[output.finish_reason]
    return {DISAGG_KEY: params}


def hand_off_of(request: Mapping[str, Any]) -> PrefillHandOff | None:
    """The prefill's hand-off in a decode request; None when the request came without one (the
    decode worker then prefills itself)."""
    result = request.get("prefill_result")
    if not result:
        return None
    params = (result.get("disaggregated_params") or {}).get(DISAGG_KEY)
    if not isinstance(params, dict) or not isinstance(params.get("first_token_id"), int):
        raise InvalidRequestError(
            f"prefill_result.disaggregated_params has no {DISAGG_KEY!r} entry with a first_token_id:"
            " was the prefill worker a Tandem worker?", field="prefill_result")
    handle = None
    if "kv_handle" in params:
        try:
            handle = handle_from_proto(json_format.ParseDict(params["kv_handle"], pb.KVHandle()))
        except (json_format.ParseError, ValueError) as error:
            raise InvalidRequestError(f"bad kv_handle in prefill_result: {error}", field="prefill_result") from error
    return PrefillHandOff(params["first_token_id"], handle, params.get("finish_reason"))
