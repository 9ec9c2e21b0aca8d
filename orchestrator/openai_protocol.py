"""The OpenAI wire protocol of the orchestrator: request models, response builders, SSE framing.

Pure: no I/O, no clock, no torch. The HTTP app parses a body with `parse_request`, maps it to the
worker's `SamplingParams` fields with `.sampling_params()`, turns engine output (plain strings,
floats and counts) into response dicts with the builders, and renders any `APIError` with
`error_body` (both from `openai_errors.py`, re-exported here). Decisions (each a 400 naming the
field, never a silent ignore):

- One prompt per request: a string, a list of token ids, or a one-element list of either;
  several prompts are "batched prompts are not supported". An empty string is left to the
  tokenizer (a BOS may make it valid); an empty token list is rejected.
- `n` and `best_of` must be 1 and `echo` false; `suffix`, `logit_bias`, `tools` and a
  `response_format` other than text are rejected, since ignoring them would change the output.
  Fields OpenAI does not define are ignored, as OpenAI does.
- Types are strict ("0.5" is not a number, true is not 1); null means "the default".
- An absent temperature is OpenAI's 1.0, not the engine's greedy default. `top_k` -1 (vLLM's
  "disabled") is accepted as 0.
"""
from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator

from tandem.orchestrator.openai_errors import APIError, ErrorType, api_error_from_validation, error_body

__all__ = [
    "APIError", "ChatCompletionRequest", "ChatMessage", "ChatStream", "CompletionRequest", "CompletionStream",
    "ErrorType", "ResponseMeta", "SSE_DONE", "StreamOptions", "TextPart", "api_error_from_validation",
    "chat_logprobs", "chat_response", "completion_logprobs", "completion_response", "error_body",
    "format_sse", "model_list", "new_request_id", "parse_request", "usage",
]

MAX_LOGPROBS = 20
MAX_STOP = 4
DEFAULT_TEMPERATURE = 1.0
MIN_LOGPROB = -9999.0  # JSON has no -inf: a zero-probability token reports this (as vLLM does)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_TOKEN_ID, MAX_TOP_K = 2**32 - 1, 2**31 - 1  # the wire's uint32 and int32 (proto/tandem.proto)
SSE_DONE = b"data: [DONE]\n\n"
FinishReason = Literal["stop", "length"]
Json = dict[str, Any]
TopLogprobs = Sequence[Sequence[tuple[str, float]]]  # per token: (token, logprob) alternatives

Request = TypeVar("Request", bound=BaseModel)


def parse_request(model: type[Request], body: bytes | str | Mapping[str, Any]) -> Request:
    """Validate a raw JSON body (or an already decoded object); every failure is a 400 APIError."""
    try:
        if isinstance(body, Mapping):
            return model.model_validate(body)
        return model.model_validate_json(body)
    except ValidationError as e:
        raise api_error_from_validation(e) from e


# -------------------------------------------------------------------------------------- requests

_STRICT = ConfigDict(strict=True, extra="ignore")


def _str_or_list(value: Any) -> str:
    return "list" if isinstance(value, list) else "str"


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields both endpoints share. Order matters: a validator may read the fields above it."""

    model_config = _STRICT
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)  # extension; 0 or -1 disables
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = None  # extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # extension
    ignore_eos: bool | None = None  # extension
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (a full response always has usage)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int, logprobs: int | None) -> Json:
        return {
            "max_tokens": max_tokens,
            "temperature": _or(self.temperature, DEFAULT_TEMPERATURE),
            "top_p": _or(self.top_p, 1.0),
            "top_k": max(_or(self.top_k, 0), 0),
            "min_p": _or(self.min_p, 0.0),
            "seed": self.seed,
            "presence_penalty": _or(self.presence_penalty, 0.0),
            "frequency_penalty": _or(self.frequency_penalty, 0.0),
            "repetition_penalty": _or(self.repetition_penalty, 1.0),
            "stop": tuple(self.stop or ()),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": bool(self.ignore_eos),
            "logprobs": logprobs,
        }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


_TokenIds = list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`."""

    prompt: Annotated[Union[Annotated[str, Tag("str")], Annotated[_TokenIds, Tag("list")]], Discriminator(_str_or_list)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) > 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt must not be empty")
        if not isinstance(value, (str, list)):
            raise ValueError("the prompt must be a string or a list of token ids")
        return value

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = {"echo": False, "suffix": "", "best_of": 1}[info.field_name]
        if value is not None and (type(value) is not type(allowed) or value != allowed):
            raise ValueError(f"{info.field_name}={value!r} is not supported")
        return value

    def sampling_params(self) -> Json:
        """The worker's `SamplingParams` fields, by name."""
        return self._sampling(_or(self.max_tokens, 16), self.logprobs)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        Union[Annotated[str, Tag("str")], Annotated[list[TextPart], Tag("list")]], Discriminator(_str_or_list)
    ] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("content is required")
        return value

    @property
    def text(self) -> str:
        """The content as one string; text parts are joined with newlines (as vLLM does)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of the next
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: Json | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Json | None) -> Json | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return value

    def template_messages(self) -> list[dict[str, str]]:
        """`[{role, content}]` with content as one string: the input of a chat template."""
        return [{"role": m.role, "content": m.text} for m in self.messages]

    def sampling_params(self, *, default_max_tokens: int) -> Json:
        """The worker's `SamplingParams` fields, by name. `default_max_tokens` applies when the
        client sets no limit (the app passes the context window minus the prompt length)."""
        max_tokens = _or(self.max_completion_tokens, _or(self.max_tokens, default_max_tokens))
        return self._sampling(max_tokens, _or(self.top_logprobs, 0) if self.logprobs else None)


# ------------------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response and chunk of one request repeats."""

    id: str
    model: str
    created: int  # Unix seconds


def new_request_id(prefix: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB  # nan and -inf alike


def completion_logprobs(
    tokens: Sequence[str], logprobs: Sequence[float], top_logprobs: TopLogprobs | None = None, text_offset: int = 0
) -> Json:
    """The completions shape; `text_offset` is where the first token starts in the output text."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    tops = None
    if top_logprobs is not None:  # two ids may decode to the same string: keep the first (best)
        tops = [{tok: _finite(lp) for tok, lp in reversed(alternatives)} for alternatives in top_logprobs]
    return {
        "tokens": list(tokens),
        "token_logprobs": [_finite(lp) for lp in logprobs],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float], top_logprobs: TopLogprobs | None = None) -> Json:
    """The chat shape; `bytes` are the UTF-8 of the token string as decoded."""
    tops: TopLogprobs = top_logprobs if top_logprobs is not None else [()] * len(tokens)
    return {
        "content": [
            {**_chat_token(tok, lp), "top_logprobs": [_chat_token(t, l) for t, l in alternatives]}
            for tok, lp, alternatives in zip(tokens, logprobs, tops, strict=True)
        ]
    }


def _chat_token(token: str, logprob: float) -> Json:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8", "replace"))}


def _envelope(meta: ResponseMeta, obj: str, choices: list[Json], **extra: Any) -> Json:
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": choices, **extra}


def completion_response(
    meta: ResponseMeta, text: str, finish_reason: FinishReason, usage: Json, logprobs: Json | None = None
) -> Json:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(meta, "text_completion", [choice], usage=usage)


def chat_response(
    meta: ResponseMeta, text: str, finish_reason: FinishReason, usage: Json, logprobs: Json | None = None
) -> Json:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(meta, "chat.completion", [choice], usage=usage)


class _ChunkStream:
    """The chunks of one streamed response. With `include_usage`, every chunk has `usage: null`
    and `usage_chunk` makes the last one (no choices), as OpenAI does."""

    _object: str

    def __init__(self, meta: ResponseMeta, include_usage: bool = False):
        self.meta, self.include_usage = meta, include_usage
        self.started = self.finished = False

    def _chunk(self, choice: Json, finish_reason: FinishReason | None) -> Json:
        assert not self.finished, "a chunk after the finishing chunk"
        self.started, self.finished = True, finish_reason is not None
        extra = {"usage": None} if self.include_usage else {}
        choice = {"index": 0, **choice, "finish_reason": finish_reason}
        return _envelope(self.meta, self._object, [choice], **extra)

    def usage_chunk(self, usage: Json) -> Json:
        assert self.include_usage, "usage chunk not requested"
        return _envelope(self.meta, self._object, [], usage=usage)


class CompletionStream(_ChunkStream):
    _object = "text_completion"

    def chunk(self, text: str, *, logprobs: Json | None = None, finish_reason: FinishReason | None = None) -> Json:
        return self._chunk({"text": text, "logprobs": logprobs}, finish_reason)


class ChatStream(_ChunkStream):
    """The first chunk carries `delta.role`; the one with `finish_reason` is the last with a choice."""

    _object = "chat.completion.chunk"

    def chunk(self, text: str, *, logprobs: Json | None = None, finish_reason: FinishReason | None = None) -> Json:
        delta: Json = {} if self.started else {"role": "assistant"}
        if text or finish_reason is None or not self.started:
            delta["content"] = text
        return self._chunk({"delta": delta, "logprobs": logprobs}, finish_reason)


def model_list(model_ids: Sequence[str], created: int, owned_by: str = "tandem") -> Json:
    """`GET /v1/models`."""
    data = [{"id": m, "object": "model", "created": created, "owned_by": owned_by} for m in model_ids]
    return {"object": "list", "data": data}


def format_sse(obj: Mapping[str, Any] | BaseModel) -> bytes:
    """One server-sent event: `data: <compact JSON>\\n\\n` (JSON escapes every newline)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"data: " + payload.encode("utf-8", "replace") + b"\n\n"
