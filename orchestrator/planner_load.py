"""What the planner reads: a worker's profiled capacity, one interval's observation, the load forecast.

Pure: no I/O, no clock. `WorkerProfile` is what `tandem profile` measures (read here from its
dict / JSON); `Observation` is what the orchestrator measured over one planner interval;
`LoadPredictor` turns the sequence of observations into the load the next interval is sized for.
The predictor is the only stateful piece: one per planner, fed once per interval, in order.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from tandem.orchestrator.autoscale_policy import Percentile


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """One worker's capacity, per pool, as `tandem profile` measured it."""

    prefill_tokens_per_s: float  # prompt tokens one context worker prefills per second, saturated
    decode_tokens_per_s: float  # output tokens one generation worker emits per second (all its sequences) at the ITL SLO
    max_concurrent_seqs: int  # sequences one generation worker decodes at once (KV capacity and batch limit)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"worker profile: {f.name} must be a positive number, got {value!r}")
        if not isinstance(self.max_concurrent_seqs, int):
            raise ValueError(f"worker profile: max_concurrent_seqs must be an integer, got {self.max_concurrent_seqs!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> WorkerProfile:
        """From the mapping `tandem profile` writes; a missing or unknown key is a ValueError naming it."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"worker profile: unknown key {unknown[0]!r}; expected {', '.join(names)}")
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"worker profile: missing key {missing[0]!r}")
        return cls(**data)  # type: ignore[arg-type]  # __post_init__ checks every value

    @classmethod
    def from_json(cls, text: str) -> WorkerProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"worker profile: invalid JSON at line {e.lineno}: {e.msg}") from e
        if not isinstance(data, dict):
            raise ValueError(f"worker profile: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


@dataclass(frozen=True, slots=True)
class Observation:
    """One planner interval, as the orchestrator measured it."""

    context_replicas: int  # workers serving in each pool during the interval
    generation_replicas: int
    arrival_rate: float  # requests/s
    mean_prompt_tokens: float  # prompt tokens a context worker computes per request (uncached)
    mean_output_tokens: float
    queued_prefill_tokens: int = 0  # prompt tokens waiting on context workers at the interval's end
    running_seqs: int = 0  # sequences decoding on generation workers at the interval's end
    context_kv_usage: float = 0.0  # fraction of KV blocks in use, pool mean
    generation_kv_usage: float = 0.0
    ttft_ms: Mapping[Percentile, float] = field(default_factory=dict)  # measured, by percentile; empty: no requests
    itl_ms: Mapping[Percentile, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("arrival_rate", "mean_prompt_tokens", "mean_output_tokens", "queued_prefill_tokens", "running_seqs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"observation: {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("context_kv_usage", "generation_kv_usage"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"observation: {name} must be within [0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class Forecast:
    """The load the next interval is sized for."""

    arrival_rate: float  # requests/s
    prompt_tokens: float  # per request
    output_tokens: float
    trend: float  # requests/s gained per interval (smoothed); negative while load falls


class LoadPredictor:
    """Holt's linear smoothing of the arrival rate, exponential smoothing of the lengths.

    level_t = alpha * x_t + (1 - alpha) * (level_{t-1} + trend_{t-1})
    trend_t = beta * (level_t - level_{t-1}) + (1 - beta) * trend_{t-1}

    The forecast is asymmetric on purpose: max(level + max(trend, 0), x_t). A rising load is met
    one interval ahead (and never below what was just measured, so a step is answered at once); a
    falling load releases capacity only as the smoothed level falls, so a one-interval dip does not.
    Lengths take max(smoothed, last) for the same reason.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        if not (0 < alpha <= 1 and 0 <= beta <= 1):
            raise ValueError(f"load predictor: alpha must be in (0, 1] and beta in [0, 1], got {alpha}, {beta}")
        self._alpha, self._beta = alpha, beta
        self._level: float | None = None
        self._trend = 0.0
        self._prompt = 0.0
        self._output = 0.0

    def update(self, obs: Observation) -> Forecast:
        """Fold in one interval; return the forecast for the next."""
        a, b = self._alpha, self._beta
        if self._level is None:
            self._level, self._prompt, self._output = obs.arrival_rate, obs.mean_prompt_tokens, obs.mean_output_tokens
        else:
            previous = self._level
            self._level = a * obs.arrival_rate + (1 - a) * (previous + self._trend)
            self._trend = b * (self._level - previous) + (1 - b) * self._trend
            self._prompt = a * obs.mean_prompt_tokens + (1 - a) * self._prompt
            self._output = a * obs.mean_output_tokens + (1 - a) * self._output
        rate = max(self._level + max(self._trend, 0.0), obs.arrival_rate, 0.0)
        return Forecast(
            arrival_rate=rate,
            prompt_tokens=max(self._prompt, obs.mean_prompt_tokens),
            output_tokens=max(self._output, obs.mean_output_tokens),
            trend=self._trend,
        )
