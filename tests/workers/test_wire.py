"""Sampling parameters across the wire: an unset field means the engine's (and OpenAI's) default,
not proto3's zero, and every set field arrives as sent."""
from __future__ import annotations

from tandem.orchestrator.worker_client import sampling_params_to_proto
from tandem.proto import tandem_pb2 as pb
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.wire import sampling_params_from_proto


def test_unset_fields_take_the_engine_defaults() -> None:
    params = sampling_params_from_proto(pb.SamplingParams(max_tokens=5), "r")
    assert params == SamplingParams(max_tokens=5, temperature=0.0)  # the orchestrator always sends temperature
    assert params.skip_special_tokens and params.top_p == 1.0 and params.repetition_penalty == 1.0
    assert params.seed is None and params.logprobs is None


def test_what_the_orchestrator_sends_arrives() -> None:
    sent = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.75, "seed": 3, "stop": ["\n"], "logprobs": 0,
            "ignore_eos": True, "skip_special_tokens": False}
    params = sampling_params_from_proto(sampling_params_to_proto(sent), "r")
    assert params == SamplingParams(**{**sent, "stop": ("\n",)})
