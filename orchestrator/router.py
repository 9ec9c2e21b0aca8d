"""Routing policies: which context and generation worker serve one request. Pure: no I/O, no clock.

Every policy makes the same two-step decision (design.md, "Route"):

1. pick a generation worker (role generation, or aggregated: one that prefills and decodes);
2. conditional disaggregation: an aggregated worker, or a generation worker that holds all but at
   most `local_prefill_max_tokens` of the prompt, prefills it itself (`context_worker=None`);
   otherwise pick a context worker, which prefills and hands its KV off.

Policies differ only in how they pick. Inputs are a snapshot: the caller passes the worker loads
(from Stats) and, per worker, how many leading prompt blocks it holds (from the cluster block
index). Ties break by worker id, so a snapshot always gives the same route; `RoundRobinRouter`
is the only one with state (the last worker it chose per role).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

WorkerRole = Literal["context", "generation", "aggregated"]
ROLES: tuple[WorkerRole, ...] = ("context", "generation", "aggregated")


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker's load, as its last Stats reported it."""

    worker_id: str
    role: WorkerRole
    num_free_blocks: int
    num_total_blocks: int
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int  # prompt tokens admitted but not yet computed
    healthy: bool = True  # False: dead, draining or unreachable; never routed to

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker {self.worker_id}: unknown role {self.role!r}; expected one of {ROLES}")

    @property
    def free_fraction(self) -> float:
        return self.num_free_blocks / self.num_total_blocks if self.num_total_blocks > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Route:
    context_worker: str | None  # None: the generation worker prefills the prompt itself
    generation_worker: str
    cached_tokens_on_context: int  # 0 when context_worker is None
    cached_tokens_on_generation: int
    reason: str  # "disaggregated", "local_prefill", "no_context_worker" or "aggregated": a log field and metric label


class RoutingError(Exception):
    """No healthy worker of a role this request needs."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


class Router(Protocol):
    def route(
        self, prompt_len: int, cached_blocks: Mapping[str, int], workers: Sequence[WorkerLoad], block_size: int
    ) -> Route: ...


@dataclass(frozen=True, slots=True)
class _Request:
    """What a policy sees of the request being routed."""

    prompt_len: int
    cached_blocks: Mapping[str, int]
    block_size: int

    def cached_tokens(self, worker_id: str) -> int:
        return min(self.cached_blocks.get(worker_id, 0) * self.block_size, self.prompt_len)

    def uncached_tokens(self, worker_id: str) -> int:
        return self.prompt_len - self.cached_tokens(worker_id)

    def new_blocks(self, worker_id: str) -> int:
        """Blocks a worker must allocate for the prompt, beyond the prefix it holds."""
        total = -(-self.prompt_len // self.block_size)
        return max(total - self.cached_blocks.get(worker_id, 0), 0)


class _TwoStepRouter:
    """The shared decision; subclasses pick among healthy candidates (never empty, sorted by id)."""

    def __init__(self, local_prefill_max_tokens: int = 0) -> None:
        if local_prefill_max_tokens < 0:
            raise ValueError("local_prefill_max_tokens must be >= 0")
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def route(
        self, prompt_len: int, cached_blocks: Mapping[str, int], workers: Sequence[WorkerLoad], block_size: int
    ) -> Route:
        if prompt_len < 1 or block_size < 1:
            raise ValueError(f"prompt_len and block_size must be >= 1, got {prompt_len} and {block_size}")
        request = _Request(prompt_len, cached_blocks, block_size)
        gen = self._pick_generation(request, _healthy(workers, ("generation", "aggregated")))
        cached_gen = request.cached_tokens(gen.worker_id)
        if gen.role == "aggregated":
            return Route(None, gen.worker_id, 0, cached_gen, "aggregated")
        if request.uncached_tokens(gen.worker_id) <= self.local_prefill_max_tokens:
            return Route(None, gen.worker_id, 0, cached_gen, "local_prefill")
        if not any(w.role == "context" and w.healthy for w in workers):
            # Slower for the generation worker's other requests, but served rather than refused
            # while the context pool is down or every KV hand-off is failing.
            return Route(None, gen.worker_id, 0, cached_gen, "no_context_worker")
        ctx = self._pick_context(request, _healthy(workers, ("context",)))
        return Route(ctx.worker_id, gen.worker_id, request.cached_tokens(ctx.worker_id), cached_gen, "disaggregated")

    def _pick_generation(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        raise NotImplementedError

    def _pick_context(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        raise NotImplementedError


def _healthy(workers: Sequence[WorkerLoad], roles: tuple[WorkerRole, ...]) -> list[WorkerLoad]:
    found = sorted((w for w in workers if w.role in roles and w.healthy), key=lambda w: w.worker_id)
    if not found:
        known = sum(w.role in roles for w in workers)
        raise RoutingError(roles[0], f"no healthy {' or '.join(roles)} worker ({known} known)")
    return found


class RoundRobinRouter(_TwoStepRouter):
    """Each role's healthy workers in turn, by id: the next id after the last one chosen, wrapping.

    Following ids rather than an index keeps the rotation fair while workers join and leave.
    """

    def __init__(self, local_prefill_max_tokens: int = 0) -> None:
        super().__init__(local_prefill_max_tokens)
        self._last: dict[str, str] = {}  # side ("context" | "generation") -> worker id chosen last

    def _next(self, side: str, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        last = self._last.get(side)
        chosen = next((w for w in candidates if last is None or w.worker_id > last), candidates[0])
        self._last[side] = chosen.worker_id
        return chosen

    def _pick_generation(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        return self._next("generation", candidates)

    def _pick_context(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        return self._next("context", candidates)


class LeastLoadRouter(_TwoStepRouter):
    """Context: fewest queued prefill tokens, then fewest waiting. Generation: most free blocks,
    then fewest running. Blind to prefix caches."""

    def _pick_generation(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        return min(candidates, key=lambda w: (-w.num_free_blocks, w.num_running, w.worker_id))

    def _pick_context(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        return min(candidates, key=lambda w: (w.queued_prefill_tokens, w.num_waiting, w.worker_id))


class KVAwareRouter(_TwoStepRouter):
    """Context by prefill cost, generation by decode load less a bonus for its own cached prefix.

    Context cost, in tokens: uncached prompt tokens there + queued prefill tokens.
    Generation cost, dimensionless (lower is better), among workers whose free blocks fit the
    prompt's new blocks (all of them when none fits):
        (running + waiting) / seq_capacity            batch fill
      + 1 - (free - new blocks) / total               KV fill once the prompt is admitted
      - prefix_weight * cached tokens / prompt_len    prefix it need neither prefill nor READ
    With the defaults a worker holding the whole prompt wins unless it is about a full batch or a
    full cache busier than the others.
    """

    def __init__(self, local_prefill_max_tokens: int = 0, prefix_weight: float = 1.0, seq_capacity: int = 64) -> None:
        super().__init__(local_prefill_max_tokens)
        if prefix_weight < 0 or seq_capacity < 1:
            raise ValueError("prefix_weight must be >= 0 and seq_capacity >= 1")
        self.prefix_weight = prefix_weight
        self.seq_capacity = seq_capacity

    def _generation_cost(self, request: _Request, w: WorkerLoad) -> float:
        batch_fill = (w.num_running + w.num_waiting) / self.seq_capacity
        total = max(w.num_total_blocks, 1)
        kv_fill = 1.0 - (w.num_free_blocks - request.new_blocks(w.worker_id)) / total
        prefix = self.prefix_weight * request.cached_tokens(w.worker_id) / request.prompt_len
        return batch_fill + kv_fill - prefix

    def _pick_generation(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        fitting = [w for w in candidates if w.num_free_blocks >= request.new_blocks(w.worker_id)] or candidates
        return min(fitting, key=lambda w: (self._generation_cost(request, w), w.worker_id))

    def _pick_context(self, request: _Request, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        return min(candidates, key=lambda w: (request.uncached_tokens(w.worker_id) + w.queued_prefill_tokens, w.worker_id))


POLICIES: dict[str, type[_TwoStepRouter]] = {
    "round_robin": RoundRobinRouter,
    "least_load": LeastLoadRouter,
    "kv_aware": KVAwareRouter,
}


def make_router(policy_name: str, local_prefill_max_tokens: int) -> Router:
    """The router a serve config's `router.policy` names."""
    try:
        policy = POLICIES[policy_name]
    except KeyError:
        raise ValueError(f"unknown routing policy {policy_name!r}; expected one of {sorted(POLICIES)}") from None
    return policy(local_prefill_max_tokens)
