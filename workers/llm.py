"""The Python API: `LLM(...).generate(prompts, params)` for a batch, `LLM(...).stream(...)` for one.

    from tandem.workers import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct; or LLM(model="/path/to/hf-dir-or.gguf")
    for out in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.text)

All prompts of one generate() call run together in the continuous batch.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine, RequestOutput
from tandem.workers.errors import InvalidRequestError
from tandem.workers.sampler import TokenLogprobs
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import SchedulerConfig
from tandem.workers.sequence import FinishReason

Prompt = str | Seq[int]


@dataclass(slots=True)
class CompletionOutput:
    """One finished request."""

    request_id: str
    prompt: Prompt
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        self.text += delta.new_text
        self.token_ids.extend(delta.new_token_ids)
        self.logprobs.extend(delta.new_logprobs)
        self.finish_reason = delta.finish_reason
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = delta.num_cached_tokens


class LLM:
    """Offline inference over one engine."""

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        max_model_len: int | None = None,
        show_progress: bool = True,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
    ) -> None:
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            show_progress=show_progress,
            cache=cache or CacheConfig(),
            scheduler=scheduler or SchedulerConfig(),
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
        )
        self._attach(LLMEngine.from_config(config))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an engine built elsewhere, e.g. a second KV-cache size over an already loaded model."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._ids = itertools.count()
        # Outputs per request id, filled by whichever caller steps the engine: several streams
        # (and a generate) may be open at once, and none may swallow another's tokens.
        self._outputs: dict[str, deque[RequestOutput]] = {}

    def close(self) -> None:
        """Stop the engine's tensor-parallel followers, if any (also on leaving a with block)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer, or None for a bare checkpoint
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Run every prompt to completion in one continuous batch; outputs keep the prompts' order.
        A bad prompt raises InvalidRequestError and none of the prompts is left running."""
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        request_ids = [f"gen-{next(self._ids)}" for _ in prompt_list]
        try:
            for rid, prompt, p in zip(request_ids, prompt_list, param_list):
                self._add(rid, prompt, p)
            results = {rid: CompletionOutput(rid, p) for rid, p in zip(request_ids, prompt_list)}
            for rid in request_ids:
                for out in self._follow(rid):
                    results[rid].add(out)
        finally:
            for rid in request_ids:
                self._forget(rid)
        return [results[rid] for rid in request_ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's deltas as the engine produces them. Closing the iterator early
        aborts the request and frees its blocks."""
        rid = f"stream-{next(self._ids)}"
        self._add(rid, prompt, params or SamplingParams())
        try:
            yield from self._follow(rid)
        finally:
            self._forget(rid)

    def _add(self, rid: str, prompt: Prompt, params: SamplingParams) -> None:
        self.engine.add_request(rid, prompt, params)
        self._outputs[rid] = deque()

    def _follow(self, rid: str) -> Iterator[RequestOutput]:
        """rid's outputs up to its last, stepping the engine whenever none is waiting."""
        queue = self._outputs[rid]
        while True:
            while not queue:
                for out in self.engine.step():
                    if out.request_id in self._outputs:
                        self._outputs[out.request_id].append(out)
            out = queue.popleft()
            yield out
            if out.finished:
                return

    def _forget(self, rid: str) -> None:
        """Stop tracking rid; abort it (freeing its blocks at once) if it has not finished."""
        if self._outputs.pop(rid, None) is not None:
            self.engine.abort(rid)


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt of token ids
    return items


def _as_param_list(params: SamplingParams | Seq[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    param_list = list(params)
    if len(param_list) != count:
        raise InvalidRequestError(f"got {len(param_list)} SamplingParams for {count} prompts", field="params")
    return param_list
