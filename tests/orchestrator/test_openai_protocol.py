"""The OpenAI protocol layer: request validation and mapping, response shapes, SSE framing, errors.

Compatibility is checked against the official `openai` client itself: its pydantic types validate
what the builders produce, and a client over an in-process transport parses our bytes.
"""
from __future__ import annotations

import json
import math
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tandem.orchestrator.openai_protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    ChatStream,
    CompletionRequest,
    CompletionStream,
    ResponseMeta,
    api_error_from_validation,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    error_body,
    format_sse,
    model_list,
    parse_request,
    usage,
)
from tandem.workers.sampling_params import SamplingParams  # torch-free; the orchestrator never imports it

META = ResponseMeta("chatcmpl-1", "smollm2", 1_700_000_000)
USER = [{"role": "user", "content": "hi"}]
JSON = "application/json"


def completion(**fields: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "hi", **fields}))


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, json.dumps({"model": "m", "messages": USER, **fields}))


# ---------------------------------------------------------------------------------- requests


def test_completion_maps_every_field_to_sampling_params() -> None:
    request = completion(
        max_tokens=32, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=7, stop=["\n", "END"],
        stop_token_ids=[2], presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
        ignore_eos=True, logprobs=5, n=1, echo=False, best_of=1, user="u", stream=True,
        stream_options={"include_usage": True}, some_future_field={"ignored": True},
    )
    params = request.sampling_params()
    assert params == {
        "max_tokens": 32, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
        "stop": ("\n", "END"), "stop_token_ids": (2,), "ignore_eos": True, "logprobs": 5,
    }
    assert request.include_usage and request.stream
    SamplingParams(**params)  # the worker accepts it as is


def test_defaults_are_openai_defaults() -> None:
    assert completion().sampling_params() == {
        "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
        "stop": (), "stop_token_ids": (), "ignore_eos": False, "logprobs": None,
    }
    nulls = completion(max_tokens=None, temperature=None, stop=None, n=None, logprobs=None, top_k=-1)
    assert nulls.sampling_params() == completion().sampling_params()
    assert not completion(stream=True).include_usage


def test_chat_maps_limits_and_logprobs() -> None:
    assert chat().sampling_params(default_max_tokens=900)["max_tokens"] == 900
    assert chat(max_tokens=5).sampling_params(default_max_tokens=900)["max_tokens"] == 5
    assert chat(max_tokens=5, max_completion_tokens=7).sampling_params(default_max_tokens=900)["max_tokens"] == 7
    assert chat(logprobs=True).sampling_params(default_max_tokens=1)["logprobs"] == 0
    assert chat(logprobs=True, top_logprobs=3).sampling_params(default_max_tokens=1)["logprobs"] == 3
    assert chat(logprobs=False).sampling_params(default_max_tokens=1)["logprobs"] is None
    params = chat(stop="\n", temperature=0, seed=3).sampling_params(default_max_tokens=64)
    assert params["stop"] == ("\n",) and params["temperature"] == 0.0 and params["seed"] == 3
    SamplingParams(**params)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hello", "hello"), ([1, 2, 3], [1, 2, 3]), (["hello"], "hello"), ([[4, 5]], [4, 5]), ("", "")],
)
def test_one_prompt_in_any_openai_form(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt).prompt == expected


def test_chat_content_as_text_parts() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    request = chat(messages=messages)
    assert request.messages[1].text == "line one\nline two"
    assert request.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42"},
    ]


BAD_COMPLETIONS = [
    ({"prompt": ["one", "two"]}, "prompt", "batched prompts are not supported"),
    ({"prompt": [[1], [2]]}, "prompt", "batched prompts are not supported"),
    ({"prompt": []}, "prompt", "must not be empty"),
    ({"prompt": [1, -2]}, "prompt.1", "greater than or equal to 0"),
    ({"prompt": 5}, "prompt", "string or a list of token ids"),
    ({"n": 2}, "n", "only n=1 is supported"),
    ({"echo": True}, "echo", "not supported"),
    ({"best_of": 2}, "best_of", "not supported"),
    ({"suffix": "x"}, "suffix", "not supported"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 2.01}, "temperature", "less than or equal to 2"),
    ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"seed": 2**64}, "seed", "less than or equal to"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
    ({"stop": ["a", ""]}, "stop.1", "at least 1 character"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids.1", "greater than or equal to 0"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"logprobs": True}, "logprobs", "valid integer"),
    ({"max_tokens": True}, "max_tokens", "valid integer"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "valid boolean"),
    ({"model": None}, "model", "valid string"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_COMPLETIONS)
def test_bad_completion_parameter_is_a_400_naming_it(fields: dict, param: str, message: str) -> None:
    with pytest.raises(APIError) as info:
        completion(**fields)
    err = info.value
    assert (err.status, err.type.value, err.param) == (400, "invalid_request_error", param)
    assert message in err.message and f"'{param}'" in err.message


BAD_CHATS = [
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'system', 'developer'"),
    ({"messages": [*USER, {"role": "user"}]}, "messages.1.content", "content is required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "Input should be 'text'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text", "Missing"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid string"),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "Missing required parameter"),
    ({"n": 3}, "n", "only n=1 is supported"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"logprobs": 5}, "logprobs", "valid boolean"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only response_format type 'text'"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_CHATS)
def test_bad_chat_parameter_is_a_400_naming_it(fields: dict, param: str, message: str) -> None:
    with pytest.raises(APIError) as info:
        chat(**fields)
    assert (info.value.status, info.value.param) == (400, param)
    assert message in info.value.message


def test_malformed_json_and_non_object_bodies_are_400() -> None:
    for body in (b'{"model": "m", ', b"not json", b""):
        with pytest.raises(APIError) as info:
            parse_request(CompletionRequest, body)
        assert (info.value.status, info.value.param) == (400, None)
        assert info.value.message.startswith("We could not parse the JSON body of your request")
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, b"[1, 2]")
    assert (info.value.status, info.value.param) == (400, None)
    assert "object" in info.value.message


def test_fastapi_error_lists_drop_the_body_prefix() -> None:
    fastapi_errors = [{"type": "less_than_equal", "loc": ("body", "messages", 0, "role"), "msg": "bad", "input": 1}]
    assert api_error_from_validation(fastapi_errors).param == "messages.0.role"
    assert api_error_from_validation([{"type": "json_invalid", "loc": ("body", 7), "msg": "x"}]).param is None


def test_error_body_has_openai_shape() -> None:
    err = APIError.invalid_request("bad n", param="n")
    expected = {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": None}
    assert error_body(err) == {"error": expected}
    assert (APIError.model_not_found("x").status, APIError.model_not_found("x").code) == (404, "model_not_found")
    assert error_body(APIError.model_not_found("x"))["error"]["type"] == "not_found_error"
    assert (APIError.unauthorized().status, APIError.unauthorized().type.value) == (401, "authentication_error")
    assert (APIError.rate_limited("slow down").status, APIError.server_error("busy", status=503).status) == (429, 503)


# --------------------------------------------------------------------------------- responses


def test_sse_framing_is_byte_exact() -> None:
    assert format_sse({"a": 1, "b": "é\n"}) == b'data: {"a":1,"b":"\xc3\xa9\\n"}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert format_sse(model_list(["m"], 5)) == (
        b'data: {"object":"list","data":[{"id":"m","object":"model","created":5,"owned_by":"tandem"}]}\n\n'
    )
    with pytest.raises(ValueError):
        format_sse({"x": math.nan})  # never invalid JSON on the wire


def test_chat_chunks_role_first_finish_last_usage_after() -> None:
    stream = ChatStream(META, include_usage=True)
    chunks = [stream.chunk("Hel"), stream.chunk("lo"), stream.chunk("", finish_reason="stop")]
    chunks.append(stream.usage_chunk(usage(5, 3, cached_tokens=4)))
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas == [{"role": "assistant", "content": "Hel"}, {"content": "lo"}, {}, None]
    assert [c["choices"][0]["finish_reason"] if c["choices"] else "-" for c in chunks] == [None, None, "stop", "-"]
    assert [c["usage"] for c in chunks[:3]] == [None, None, None]
    assert chunks[3]["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 4}
    }
    for chunk in chunks:
        parsed = ChatCompletionChunk.model_validate(chunk)
        assert (parsed.id, parsed.object, parsed.model) == (META.id, "chat.completion.chunk", META.model)
    with pytest.raises(AssertionError):
        stream.chunk("late")


def test_chat_chunks_without_usage_and_a_single_finishing_chunk() -> None:
    stream = ChatStream(META)
    (only,) = [stream.chunk("", finish_reason="length")]
    assert only["choices"][0]["delta"] == {"role": "assistant", "content": ""} and "usage" not in only
    with pytest.raises(AssertionError):
        stream.usage_chunk(usage(1, 1))


def test_completion_stream_and_response_validate_as_openai_completion() -> None:
    meta = ResponseMeta("cmpl-1", "m", 1)
    stream = CompletionStream(meta, include_usage=True)
    last = stream.chunk("!", finish_reason="length", logprobs=completion_logprobs(["!"], [-0.1], text_offset=5))
    assert Completion.model_validate(last).choices[0].logprobs.text_offset == [5]
    assert Completion.model_validate(stream.usage_chunk(usage(2, 6))).usage.total_tokens == 8
    logprobs = completion_logprobs([" a", "b"], [-0.5, -math.inf], [[(" a", -0.5), (" A", -1.0)], [("b", -0.1)]])
    assert logprobs == {
        "tokens": [" a", "b"], "token_logprobs": [-0.5, -9999.0],
        "top_logprobs": [{" a": -0.5, " A": -1.0}, {"b": -0.1}], "text_offset": [0, 2],
    }
    body = completion_response(meta, " ab", "stop", usage(3, 2), logprobs)
    parsed = Completion.model_validate(body)
    assert (parsed.object, parsed.choices[0].text, parsed.usage.prompt_tokens_details.cached_tokens) == (
        "text_completion", " ab", 0,
    )
    assert completion_logprobs(["x"], [-1.0], [[("x", -1.0), ("x", -2.0)]])["top_logprobs"] == [{"x": -1.0}]


def test_chat_response_and_logprobs_validate_as_openai_chat_completion() -> None:
    logprobs = chat_logprobs(["é", "!"], [-0.25, -1.5], [[("é", -0.25), ("e", -2.0)], [("!", -1.5)]])
    assert logprobs["content"][0] == {
        "token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9],
        "top_logprobs": [
            {"token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9]},
            {"token": "e", "logprob": -2.0, "bytes": [101]},
        ],
    }
    parsed = ChatCompletion.model_validate(chat_response(META, "é!", "stop", usage(4, 2), logprobs))
    assert parsed.object == "chat.completion" and parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].message.content == "é!"
    assert parsed.choices[0].logprobs.content[1].top_logprobs[0].token == "!"
    assert chat_logprobs(["a"], [-1.0])["content"][0]["top_logprobs"] == []
    chunk = ChatStream(META).chunk("é", logprobs=logprobs)
    assert ChatCompletionChunk.model_validate(chunk).choices[0].logprobs.content[0].bytes == [0xC3, 0xA9]
    assert Model.model_validate(model_list(["a", "b"], 9)["data"][1]).id == "b"


# -------------------------------------------------- the official client over an in-process transport


def fake_server(routes: dict[str, tuple[int, bytes, str]]) -> openai.OpenAI:
    def handle(request: httpx.Request) -> httpx.Response:
        status, body, content_type = routes[request.url.path]
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    http = httpx.Client(transport=httpx.MockTransport(handle))
    return openai.OpenAI(api_key="x", base_url="http://tandem/v1", http_client=http, max_retries=0)


def test_openai_client_reads_a_streamed_chat_with_usage() -> None:
    stream = ChatStream(META, include_usage=True)
    events = [stream.chunk("Hi"), stream.chunk(" there", finish_reason="stop"), stream.usage_chunk(usage(3, 2))]
    body = b"".join(format_sse(e) for e in events) + SSE_DONE
    client = fake_server({"/v1/chat/completions": (200, body, "text/event-stream")})
    options = {"include_usage": True}
    chunks = list(client.chat.completions.create(model="m", messages=USER, stream=True, stream_options=options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi there"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5


def test_openai_client_reads_a_streamed_completion() -> None:
    stream = CompletionStream(ResponseMeta("cmpl-2", "m", 1))
    body = b"".join(format_sse(e) for e in (stream.chunk("a"), stream.chunk("b", finish_reason="stop"))) + SSE_DONE
    client = fake_server({"/v1/completions": (200, body, "text/event-stream")})
    chunks = list(client.completions.create(model="m", prompt="x", stream=True))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks] == [("a", None), ("b", "stop")]


def test_openai_client_reads_completions_models_and_errors() -> None:
    meta = ResponseMeta("cmpl-9", "m", 1)
    err = APIError.invalid_request("Invalid value for 'n': only n=1 is supported", param="n")
    client = fake_server({
        "/v1/completions": (200, json.dumps(completion_response(meta, "ok", "length", usage(1, 16))).encode(), JSON),
        "/v1/models": (200, json.dumps(model_list(["m"], 1)).encode(), JSON),
        "/v1/chat/completions": (err.status, json.dumps(error_body(err)).encode(), JSON),
    })
    result = client.completions.create(model="m", prompt="x")
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason, result.usage.completion_tokens) == ("ok", "length", 16)
    assert [m.id for m in client.models.list()] == ["m"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=USER, n=2)
    assert (info.value.status_code, info.value.param, info.value.type) == (400, "n", "invalid_request_error")
    assert "only n=1" in info.value.message
