"""The health of the KV transfer path between each context and generation worker, as requests
last found it.

A worker that answers Stats can still be unable to hand KV off: a peer it cannot reach over
NIXL, a pairing mismatch, leases that expire before a READ lands. Only a real hand-off shows that,
so the pipeline reports the outcome of every one (ok with its bytes and seconds, or the error)
and /health reads the last outcome per (context, generation) pair. A failure counts for
``failure_window_s`` only: a path that failed once and then saw no traffic (a load balancer that
believed /health) must come back to be tried again, not stay condemned forever.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HandoffOutcome:
    ok: bool
    at: float  # time.monotonic()
    detail: str  # "<bytes> B in <ms> ms", or the error


class TransferPaths:
    def __init__(self, failure_window_s: float = 30.0) -> None:
        self.failure_window_s = failure_window_s
        self._last: dict[tuple[str, str], HandoffOutcome] = {}

    def record(self, context_worker: str, generation_worker: str, ok: bool, detail: str) -> None:
        self._last[(context_worker, generation_worker)] = HandoffOutcome(ok, time.monotonic(), detail)

    def forget(self, worker_id: str) -> None:
        """A worker left or restarted: its paths start over untested."""
        self._last = {pair: o for pair, o in self._last.items() if worker_id not in pair}

    def status(self, context_workers: list[str], generation_workers: list[str]) -> str:
        """Of the paths between live workers: ``ok`` (no recent failure), ``degraded`` (some pairs
        failed recently), ``failing`` (every pair failed recently), or ``none`` (no pair to hand
        KV over). Cheap: the pipeline asks it for every request."""
        now = time.monotonic()
        pairs = [(c, g) for c in context_workers for g in generation_workers]
        failing = sum(1 for p in pairs if (o := self._last.get(p)) and not o.ok and now - o.at < self.failure_window_s)
        if not pairs:
            return "none"
        if not failing:
            return "ok"
        return "failing" if failing == len(pairs) else "degraded"

    def report(self, context_workers: list[str], generation_workers: list[str]) -> dict[str, Any]:
        """``status`` with the last outcome of each live pair that has one (for /health)."""
        now = time.monotonic()
        pairs = [(c, g) for c in context_workers for g in generation_workers]
        paths = {
            f"{c}->{g}": {"ok": o.ok, "seconds_ago": round(now - o.at, 1), "detail": o.detail}
            for (c, g) in pairs if (o := self._last.get((c, g))) is not None
        }
        return {"status": self.status(context_workers, generation_workers), "paths": paths}
