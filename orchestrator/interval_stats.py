"""What the requests of one planner interval looked like: arrivals, lengths, TTFT and inter-token
gaps. The app records every request here; the autoscaler takes the interval and starts the next.

Latency samples are capped per interval (MAX_SAMPLES, the earliest kept): 1,000 streams of a
thousand tokens would otherwise keep a million floats for one percentile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tandem.orchestrator.bench_stats import percentile

MAX_SAMPLES = 50_000
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0}


@dataclass(slots=True)
class Interval:
    started: float  # time.monotonic()
    ended: float = 0.0
    arrivals: int = 0
    prompt_tokens: int = 0  # of the arrivals
    uncached_prompt_tokens: int = 0  # of the finished requests: what context workers computed
    finished: int = 0
    output_tokens: int = 0  # of the finished requests
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def percentiles_ms(self, samples: list[float]) -> dict[str, float]:
        """p50/p90/p95/p99 in milliseconds; empty without samples."""
        if not samples:
            return {}
        return {name: percentile(samples, q) * 1000 for name, q in PERCENTILES.items()}


class IntervalStats:
    def __init__(self) -> None:
        self._current = Interval(time.monotonic())

    def record_arrival(self, prompt_tokens: int) -> None:
        self._current.arrivals += 1
        self._current.prompt_tokens += prompt_tokens

    def record_token_gap(self, first: bool, seconds: float) -> None:
        """The time to the first token (first=True) or since the previous one."""
        samples = self._current.ttft_s if first else self._current.itl_s
        if len(samples) < MAX_SAMPLES:
            samples.append(seconds)

    def record_finish(self, output_tokens: int, uncached_prompt_tokens: int) -> None:
        self._current.finished += 1
        self._current.output_tokens += output_tokens
        self._current.uncached_prompt_tokens += uncached_prompt_tokens

    def take(self) -> Interval:
        """The interval so far, ended now; a new one starts."""
        now = time.monotonic()
        done, self._current = self._current, Interval(now)
        done.ended = now
        return done
