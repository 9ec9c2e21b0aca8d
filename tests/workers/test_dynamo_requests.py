"""Dynamo's request and response dicts (as captured from Dynamo 1.6.1's frontend, ../shared/dynamo.md
§4 and §6) to and from Tandem's; and what `--dynamo` says where Dynamo is not installed. No Dynamo
import: this is the part of the adapter that must hold wherever the runtime wheel does not."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from tandem.kvtransfer.leases import KVHandle
from tandem.workers.dynamo_requests import chunk_of, hand_off_of, hand_off_params, prompt_of, sampling_params_of
from tandem.workers.engine import RequestOutput
from tandem.workers.errors import InvalidRequestError
from tandem.workers.sequence import FinishReason

CAPTURED = {
    "model": "tandem-tiny", "token_ids": [0, 333, 28, 223, 327, 323, 201, 67, 329, 339, 28, 223],
    "stop_conditions": {"max_tokens": 6, "stop": None, "stop_token_ids": None, "stop_token_ids_visible": None,
                        "stop_token_ids_hidden": [1], "min_tokens": None, "ignore_eos": None,
                        "max_thinking_tokens": None},
    "sampling_options": {"n": None, "best_of": None, "presence_penalty": None, "frequency_penalty": None,
                         "repetition_penalty": None, "temperature": None, "top_p": None, "top_k": None,
                         "min_p": None, "use_beam_search": None, "length_penalty": None, "seed": None,
                         "include_stop_str_in_output": None, "guided_decoding": None},
    "output_options": {"logprobs": None, "prompt_logprobs": None, "skip_special_tokens": None,
                       "formatted_prompt": None, "return_tokens_as_token_ids": None},
    "eos_token_ids": [1], "mdc_sum": "7209f1c3", "annotations": [], "routing": {}, "router_config_override": None,
}
HANDLE = KVHandle("h-1", "context-a", 17, "context-a#17", "127.0.0.1:5000", (4, 9, 2), 40, 1795677000.5,
                  staging_offset=None)


def _with(**changes: dict) -> dict:
    request = copy.deepcopy(CAPTURED)
    for section, values in changes.items():
        request[section].update(values)
    return request


def _output(tokens: tuple[int, ...], finish: FinishReason | None, num_output: int) -> RequestOutput:
    return RequestOutput("r", tokens, "", (), finish, 12, 0, num_output)


def test_captured_request_maps_to_greedy_with_hidden_stop_ids() -> None:
    params = sampling_params_of(CAPTURED, default_max_tokens=100)
    assert prompt_of(CAPTURED) == CAPTURED["token_ids"]
    assert (params.max_tokens, params.temperature, params.stop_token_ids, params.ignore_eos) == (6, 0.0, (1,), False)


def test_sampling_options_and_defaults() -> None:
    request = _with(stop_conditions={"max_tokens": None, "ignore_eos": True, "stop": ["\n\n"]},
                    sampling_options={"temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3})
    params = sampling_params_of(request, default_max_tokens=8180)
    assert (params.max_tokens, params.ignore_eos, params.stop) == (8180, True, ("\n\n",))
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.7, 0.9, 5, 3)


@pytest.mark.parametrize("request_, field", [
    (_with(sampling_options={"n": 2}), "n"),
    (_with(sampling_options={"use_beam_search": True}), "use_beam_search"),
    (_with(stop_conditions={"min_tokens": 4}), "min_tokens"),
    (_with(output_options={"logprobs": 2}), "logprobs"),
    (_with(sampling_options={"temperature": -1.0}), "temperature"),
    ({**CAPTURED, "token_ids": []}, "token_ids"),
    ({**CAPTURED, "token_ids": [1, -2]}, "token_ids"),
])
def test_unsupported_or_invalid_requests_say_which_field(request_: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        prompt_of(request_)
        sampling_params_of(request_, default_max_tokens=100)
    assert raised.value.field == field


def test_chunks_are_deltas_and_the_last_carries_finish_and_usage() -> None:
    assert chunk_of(_output((5, 6), None, 2)) == {"token_ids": [5, 6]}
    assert chunk_of(_output((7,), None, 1), first_token_id=4) == {"token_ids": [4, 7]}
    assert chunk_of(_output((8,), FinishReason.LENGTH, 6)) == {
        "token_ids": [8], "finish_reason": "length",
        "completion_usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}}
    assert chunk_of(_output((), FinishReason.ABORT, 3))["finish_reason"] == "cancelled"


def test_kv_handle_survives_the_trip_through_disaggregated_params() -> None:
    params = hand_off_params(_output((42,), None, 1), HANDLE)
    request = {**CAPTURED, "prefill_result": {"disaggregated_params": params}}
    hand_off = hand_off_of(request)
    assert hand_off is not None and hand_off.first_token_id == 42 and hand_off.finish_reason is None
    assert hand_off.handle == HANDLE


def test_a_first_token_that_ended_the_request_travels_without_a_handle() -> None:
    params = hand_off_params(_output((1,), FinishReason.STOP, 1), None)
    hand_off = hand_off_of({**CAPTURED, "prefill_result": {"disaggregated_params": params}})
    assert hand_off is not None and (hand_off.handle, hand_off.finish_reason) == (None, "stop")
    assert hand_off_of(CAPTURED) is None  # no prefill_result: the decode worker prefills itself


@pytest.mark.parametrize("disaggregated_params", [
    {"kv_transfer_params": {"do_remote_decode": True}},  # vLLM's, not ours
    {"tandem": {"first_token_id": 3, "kv_handle": {"worker_id": "w"}}},  # no handle_id or address
    {"tandem": {"first_token_id": 3, "kv_handle": {"no_such_field": 1}}},
])
def test_foreign_or_broken_hand_off_is_a_clear_error(disaggregated_params: dict) -> None:
    with pytest.raises(InvalidRequestError, match="prefill_result|kv_handle"):
        hand_off_of({**CAPTURED, "prefill_result": {"disaggregated_params": disaggregated_params}})


def test_dynamo_flag_without_the_runtime_says_how_to_install_it() -> None:
    # A meta-path entry that hides the dynamo package stands in for an install without the extra.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'dynamo' or name.startswith('dynamo.'): raise ImportError('hidden: ' + name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from tandem.orchestrator.cli import main\n"
        "sys.exit(main(['worker', '--dynamo', '--port', '0']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install 'tandem-serve[dynamo]'" in result.stderr
    assert "Loading" not in result.stderr  # said before any model loaded
