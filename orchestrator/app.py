"""The REST endpoint: OpenAI's /v1/completions and /v1/chat/completions (streamed over SSE or
not), /v1/models, /health and /metrics, over the request pipeline.

The app tokenizes and applies the chat template once; workers get token ids. Every client
error is OpenAI-shaped JSON with a 4xx status (never a 500), and a full house answers 429 with
Retry-After. A streaming client that disconnects closes the pipeline's stream, which cancels
the worker calls; the workers abort the request and free its blocks.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from tandem.orchestrator.cluster import Cluster
from tandem.orchestrator.interval_stats import IntervalStats
from tandem.orchestrator.metrics import Metrics
from tandem.orchestrator.openai_protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    ChatStream,
    CompletionRequest,
    CompletionStream,
    ResponseMeta,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    error_body,
    format_sse,
    model_list,
    new_request_id,
    parse_request,
    usage,
)
from tandem.orchestrator.pipeline import Pipeline, Waterfall
from tandem.orchestrator.request_gate import CLOSE, RequestGate
from tandem.orchestrator.router import RoutingError
from tandem.orchestrator.worker_client import GenerateDelta, WorkerCallError

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    model: str
    max_model_len: int

    def encode(self, text: str) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...
    def token_strings(self, ids: list[int]) -> list[str]: ...


@dataclass
class AppState:
    pipeline: Pipeline
    cluster: Cluster
    tokenizer: Tokenizer
    served_model_name: str
    max_concurrent_requests: int = 256
    api_key: str | None = None
    max_model_len: int | None = None  # limits.max_model_len; None: the model's (and KV cache's) own
    max_request_bytes: int = 4 << 20  # limits.max_request_bytes
    request_body_timeout_s: float = 30.0  # limits.request_body_timeout_s
    in_flight: int = 0
    interval_stats: IntervalStats = field(default_factory=IntervalStats)  # what the autoscaler reads

    @property
    def context_len(self) -> int:
        limit = self.tokenizer.max_model_len
        return min(limit, self.max_model_len) if self.max_model_len else limit


def create_app(start: Callable[[], Awaitable[AppState]], stop: Callable[[AppState], Awaitable[None]]) -> FastAPI:
    """The app; ``start`` builds its state on the server's event loop (gRPC channels and tasks
    belong to one loop), ``stop`` tears it down when the server shuts down."""
    holder: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder["state"] = await start()
        holder["metrics"] = Metrics(holder["state"].cluster)
        try:
            yield
        finally:
            await stop(holder["state"])

    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, lifespan=lifespan)

    _add_error_handlers(app)
    app.add_middleware(RequestGate, holder=holder)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state = holder["state"]
        return model_list([state.served_model_name], created=int(time.time()))

    @app.get("/health")
    async def health() -> JSONResponse:
        cluster = holder["state"].cluster
        loads = cluster.loads()
        roles = {load.role for load in loads if load.healthy}
        transfer = cluster.transfer_report()
        # A generation worker serves alone (it prefills locally) while no KV hand-off works.
        ready = "aggregated" in roles or "generation" in roles
        status = ("ok" if transfer["status"] in ("ok", "none") else "degraded") if ready else "unavailable"
        body = {"status": status, "workers": {l.worker_id: l.healthy for l in loads}, "kv_transfer": transfer}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(holder["metrics"].registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        state, metrics = holder["state"], holder["metrics"]
        body = parse_request(CompletionRequest, await _read_json(request))
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            _refuse_if_it_cannot_fit(state, len(body.prompt), "prompt")
        prompt_ids = state.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        params = body.sampling_params()
        return await _respond(state, metrics, "cmpl", prompt_ids, params, body.stream, body.include_usage)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        state, metrics = holder["state"], holder["metrics"]
        body = parse_request(ChatCompletionRequest, await _read_json(request))
        _check_model(state, body.model)
        messages = body.template_messages()
        _refuse_if_it_cannot_fit(state, sum(len(str(m.get("content") or "")) for m in messages), "messages")
        try:
            prompt_ids = state.tokenizer.apply_chat_template(messages)
        except ValueError as error:
            raise APIError.invalid_request(str(error), param="messages") from None
        params = body.sampling_params(default_max_tokens=max(1, state.context_len - len(prompt_ids)))
        return await _respond(state, metrics, "chatcmpl", prompt_ids, params, body.stream, body.include_usage)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is answered as an OpenAI error object."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        if error.status in (408, 413, 415):  # the body was left unread: the connection carries no next request
            headers = CLOSE
        return JSONResponse(error_body(error), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)  # no such route (404) or method (405): OpenAI-shaped too
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = APIError.from_http_status(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")
        return JSONResponse(error_body(error), status_code=error.status, headers=exc.headers)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of an endpoint that reads and validates its body itself (so that
    FastAPI's own validation, lax and answering 422, stays out), with the model's refs inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict) and "$ref" in node:
            return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
        if isinstance(node, dict):
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


async def _read_json(request: Request) -> bytes:
    """The body of a JSON request. A body declared as anything else is refused (415): a browser
    sends text/plain or a form across origins without asking first. No Content-Type is taken as JSON."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        kind, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
        if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
            raise APIError.unsupported_media_type(content_type)
    return await request.body()


def _refuse_if_it_cannot_fit(state: AppState, num_chars: int, param: str) -> None:
    """Refuse, before tokenizing it, a text too long to fit the context even if every token were
    the vocabulary's longest: tokenizing megabytes would hold up every other request."""
    if num_chars > state.context_len * state.tokenizer.max_token_chars:
        message = f"the prompt has {num_chars} characters, more than this model's context of {state.context_len} tokens can hold"
        raise APIError.invalid_request(message, param=param, code="context_length_exceeded")


def _check_model(state: AppState, model: str | None) -> None:
    if model is not None and model != state.served_model_name:
        raise APIError.model_not_found(model)


async def _respond(
    state: AppState, metrics: Metrics, kind: str, prompt_ids: list[int], params: dict[str, Any], stream: bool,
    include_usage: bool,
) -> Response:
    max_len = state.context_len
    if len(prompt_ids) >= max_len:
        param = "messages" if kind == "chatcmpl" else "prompt"
        message = f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_len} tokens"
        raise APIError.invalid_request(message, param=param, code="context_length_exceeded")
    if not prompt_ids:
        raise APIError.invalid_request("the prompt is empty", param="prompt")
    params["max_tokens"] = min(params["max_tokens"], max_len - len(prompt_ids))
    if state.in_flight >= state.max_concurrent_requests:
        raise APIError.rate_limited(f"{state.in_flight} requests in flight, the limit is {state.max_concurrent_requests}")
    meta = ResponseMeta(new_request_id(kind), state.served_model_name, int(time.time()))
    run = _Run(state, metrics, meta, prompt_ids, params, chat=kind == "chatcmpl")  # admitted: counted from here
    if stream:
        # The status line waits for the first delta, so that a request that fails before its first
        # token (no worker, a worker that refused) still gets its status and Retry-After, as an
        # unstreamed one does; after it, errors travel as events. The background task frees the
        # admission slot of a stream that never started (a client gone before the first byte).
        deltas = run.deltas()
        first = await anext(deltas, None)
        return StreamingResponse(run.sse(include_usage, _prepend(first, deltas)), media_type="text/event-stream",
                                 background=BackgroundTask(run.release))
    return JSONResponse(await run.complete())


class _Run:
    """One request's trip through the pipeline, and its accounting."""

    def __init__(self, state: AppState, metrics: Metrics, meta: ResponseMeta, prompt_ids: list[int],
                 params: dict[str, Any], chat: bool) -> None:
        self.state, self.metrics, self.meta = state, metrics, meta
        self.prompt_ids, self.params, self.chat = prompt_ids, params, chat
        self.waterfall = Waterfall()
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.text_offset = 0
        self.released = False
        state.in_flight += 1
        state.interval_stats.record_arrival(len(prompt_ids))

    def release(self) -> None:
        """Give the admission slot back, once."""
        if not self.released:
            self.released = True
            self.state.in_flight -= 1

    async def deltas(self) -> AsyncIterator[GenerateDelta]:
        start = last = time.perf_counter()
        try:
            async for delta in self.state.pipeline.generate(self.meta.id, self.prompt_ids, self.params, self.waterfall):
                now = time.perf_counter()
                if delta.token_ids:
                    first = not self.num_output_tokens
                    (self.metrics.ttft if first else self.metrics.itl).observe(now - last)
                    self.state.interval_stats.record_token_gap(first, now - last)
                    last = now
                self.num_output_tokens = delta.num_output_tokens or self.num_output_tokens
                self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
                self.metrics.output_tokens.inc(len(delta.token_ids))
                yield delta
        except RoutingError as error:
            raise APIError.server_error(f"no worker can serve this request: {error}", status=503) from None
        except WorkerCallError as error:
            if error.code == "INVALID_ARGUMENT":
                raise APIError.invalid_request(error.message) from None
            status = 503 if error.retriable else 500
            raise APIError.server_error(f"the request failed on a worker: {error}", status=status) from None
        finally:
            self.release()
            uncached = len(self.prompt_ids) - self.num_cached_tokens
            self.state.interval_stats.record_finish(self.num_output_tokens, uncached)
            self.metrics.e2e.observe(time.perf_counter() - start)
            self.metrics.observe_waterfall(self.waterfall)

    def usage(self) -> dict[str, Any]:
        return usage(len(self.prompt_ids), self.num_output_tokens, self.num_cached_tokens)

    def logprobs(self, delta: GenerateDelta) -> dict[str, Any] | None:
        if self.params.get("logprobs") is None or not delta.logprobs:
            return None
        strings = self.state.tokenizer.token_strings(list(delta.token_ids))
        values = [lp.logprob for lp in delta.logprobs]
        tops = [list(zip(self.state.tokenizer.token_strings([t.token_id for t in lp.top]), [t.logprob for t in lp.top]))
                for lp in delta.logprobs]
        if self.chat:
            return chat_logprobs(strings, values, tops)
        return completion_logprobs(strings, values, tops, self.text_offset)

    async def complete(self) -> dict[str, Any]:
        text, finish, logprobs = [], "stop", []
        async for delta in self.deltas():
            text.append(delta.text)
            if (lp := self.logprobs(delta)) is not None:
                logprobs.append(lp)
            self.text_offset += len(delta.text)
            finish = _openai_finish(delta.finish_reason) or finish
        merged = _merge_logprobs(logprobs, self.chat)
        build = chat_response if self.chat else completion_response
        return build(self.meta, "".join(text), finish, self.usage(), merged)

    async def sse(self, include_usage: bool, deltas: AsyncIterator[GenerateDelta]) -> AsyncIterator[bytes]:
        chunks = (ChatStream if self.chat else CompletionStream)(self.meta, include_usage)
        try:
            async for delta in deltas:
                finish = _openai_finish(delta.finish_reason)
                if delta.text or finish or delta.logprobs:
                    yield format_sse(chunks.chunk(delta.text, logprobs=self.logprobs(delta), finish_reason=finish))
                self.text_offset += len(delta.text)
            if include_usage:
                yield format_sse(chunks.usage_chunk(self.usage()))
        except APIError as error:  # the status line is sent: the error travels as an event
            yield format_sse(error_body(error))
        yield SSE_DONE


async def _prepend(first: GenerateDelta | None, rest: AsyncIterator[GenerateDelta]) -> AsyncIterator[GenerateDelta]:
    if first is not None:
        yield first
    async for delta in rest:
        yield delta


def _openai_finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _merge_logprobs(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any] | None:
    if not parts:
        return None
    if chat:
        return {"content": [token for part in parts for token in part["content"]]}
    return {key: [v for part in parts for v in (part[key] or [])] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
