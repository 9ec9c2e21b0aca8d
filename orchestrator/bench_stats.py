"""The statistics of a `tandem bench` run: pure functions over per-request records, no I/O.

Percentiles interpolate linearly between closest ranks, as numpy's default does; goodput counts
the requests per second that succeeded within both SLOs.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Slo:
    """Goodput counts the requests with TTFT <= ttft_ms and mean inter-token gap <= itl_ms."""

    ttft_ms: float | None = None
    itl_ms: float | None = None


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request; `start_s` counts from the start of the run, the rest from the request's start."""

    start_s: float
    ok: bool
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()  # the gaps between chunks that carry text
    e2e_s: float | None = None
    output_tokens: int = 0  # the usage chunk's, else the number of text chunks
    error: str | None = None  # HTTP status and body, error event, transport error or timeout


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, as `numpy.percentile(values, q)` computes it."""
    if not values or not 0 <= q <= 100:
        raise ValueError("percentile needs values and 0 <= q <= 100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(values_s: Sequence[float]) -> Json | None:
    """Mean, p50, p90 and p99 in milliseconds of values in seconds; None without values."""
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in (50, 90, 99)}}


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """Succeeded with TTFT and mean inter-token gap within their SLOs (an SLO of None always holds)."""
    if not record.ok or record.ttft_s is None:
        return False
    itl_ms = 1000 * sum(record.itl_s) / len(record.itl_s) if record.itl_s else 0.0
    return (slo.ttft_ms is None or record.ttft_s * 1000 <= slo.ttft_ms) and (slo.itl_ms is None or itl_ms <= slo.itl_ms)


def goodput(records: Sequence[RequestRecord], slo: Slo, duration_s: float) -> float | None:
    """Requests per second that succeeded within both SLOs; None when no SLO is given."""
    if slo.ttft_ms is None and slo.itl_ms is None:
        return None
    return sum(meets_slo(r, slo) for r in records) / duration_s if duration_s > 0 else 0.0


def summarize_run(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> Json:
    """The report: counts, throughputs, goodput, TTFT / ITL / E2E summaries and the commonest errors."""
    ok = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    return {
        "requests_ok": len(ok), "requests_failed": len(records) - len(ok), "duration_s": duration_s,
        "request_throughput": len(ok) * per_s, "output_tokens": tokens, "output_token_throughput": tokens * per_s,
        "goodput": goodput(records, slo, duration_s),
        "ttft_ms": summarize_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": summarize_ms([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": summarize_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "errors": dict(Counter(r.error for r in records if not r.ok).most_common(5)),
    }
