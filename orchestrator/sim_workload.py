"""The simulator's workload: requests from a JSONL trace or from Poisson arrivals. Pure: no clock.

A request is only its arrival time and its lengths; the prompt text never matters to the simulator.
Trace lines are `{"t": seconds, "prompt_tokens": n, "output_tokens": m}` (blank lines skipped, any
order; the requests come back sorted by arrival). Poisson arrivals follow a piecewise-constant rate
schedule `[(start_s, requests_per_s), ...]`, drawn from one seeded `random.Random`, so a seed always
gives the same requests.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.orchestrator.jsonl import read_jsonl


class TraceError(ValueError):
    """A trace file that cannot be read, or a line that is not a request; the message names file and line."""


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int  # computed by a context worker (no prefix cache in the simulator)
    output_tokens: int  # the first comes from the prefill, the rest from decode steps


def load_trace(path: str | Path) -> list[SimRequest]:
    """The requests of a JSONL trace, sorted by arrival."""
    requests = [_request(obj, where) for where, obj in read_jsonl(path, TraceError)]
    if not requests:
        raise TraceError(f"{path}: no requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def _request(obj: object, where: str) -> SimRequest:
    if not isinstance(obj, dict) or set(obj) != {"t", "prompt_tokens", "output_tokens"}:
        raise TraceError(f'{where}: expected an object with exactly "t", "prompt_tokens" and "output_tokens"')
    t, prompt, output = obj["t"], obj["prompt_tokens"], obj["output_tokens"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise TraceError(f'{where}: "t" must be a number of seconds >= 0, got {t!r}')
    for name, value in (("prompt_tokens", prompt), ("output_tokens", output)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TraceError(f"{where}: {name!r} must be an integer >= 1, got {value!r}")
    return SimRequest(float(t), prompt, output)


def poisson_requests(
    schedule: Sequence[tuple[float, float]], duration_s: float, prompt_tokens: int, output_tokens: int, seed: int = 0
) -> list[SimRequest]:
    """Poisson arrivals over [0, duration_s) at a piecewise-constant rate, fixed lengths.

    `schedule` is `(start_s, rate)` pairs, starts increasing from 0; a rate holds until the next start.
    """
    if not schedule or schedule[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(schedule, schedule[1:])):
        raise ValueError("rate schedule: starts must begin at 0 and increase")
    if any(rate < 0 for _, rate in schedule) or duration_s <= 0 or prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("rates must be >= 0; duration_s, prompt_tokens and output_tokens positive")
    rng = random.Random(seed)
    requests = []
    ends = [start for start, _ in schedule[1:]] + [duration_s]
    for (start, rate), end in zip(schedule, ends):
        t = start
        while rate > 0:
            t += rng.expovariate(rate)  # memoryless: restarting at a segment boundary is exact
            if t >= min(end, duration_s):
                break
            requests.append(SimRequest(t, prompt_tokens, output_tokens))
    return requests
