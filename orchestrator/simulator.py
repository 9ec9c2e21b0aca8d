"""A discrete-event simulator of one disaggregated deployment under the production router and planner.

Owns the event loop and the result; the workers and their performance model live in sim_cluster.py,
the workload in sim_workload.py. Deterministic: events at the same time run in the order they were
scheduled, and only the workload draws random numbers.

A run: the deployment starts at min_replicas per pool, serving -> each request is routed on arrival
by `make_router(params.router_policy, 0)` over `WorkerLoad` snapshots of the serving workers ->
prefill on the context worker -> KV hand-off -> decode on the generation worker. Every
`policy.interval_s` the interval's measurements become an `Observation` for `Planner.decide`; a
decision other than HOLD is applied at once: added workers serve `startup_s` later, removed ones
(still-starting first, then the least busy) drain. The run ends once every request has finished.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tandem.orchestrator.autoscale_policy import AutoscalePolicy, SloConfig
from tandem.orchestrator.bench_stats import percentile
from tandem.orchestrator.planner import Action, Planner
from tandem.orchestrator.planner_load import Observation, WorkerProfile
from tandem.orchestrator.router import make_router
from tandem.orchestrator.sim_cluster import ContextWorker, Flight, GenerationWorker, SimParams, State, Worker
from tandem.orchestrator.sim_workload import SimRequest

PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}
_ARRIVE, _PREFILLED, _HANDED_OFF, _STEPPED, _READY, _PLAN = range(6)


@dataclass(frozen=True, slots=True)
class PlanPoint:
    """One planner tick: the workers serving when it observed, the counts it asked for, why."""

    t: float
    context_serving: int
    generation_serving: int
    context_replicas: int  # the decision
    generation_replicas: int
    action: str
    reason: str


@dataclass(frozen=True, slots=True)
class RequestResult:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    mean_itl_s: float | None  # None for a single output token
    done_s: float

    def meets(self, slo: SloConfig) -> bool:
        """TTFT and mean inter-token gap within the SLO, as `tandem bench` counts goodput."""
        return self.ttft_s * 1000 <= slo.ttft_ms and (self.mean_itl_s is None or self.mean_itl_s * 1000 <= slo.itl_ms)


@dataclass(frozen=True)
class SimResult:
    slo: SloConfig
    timeline: list[PlanPoint]
    requests: list[RequestResult]  # in arrival order
    gpu_hours: float
    end_s: float

    def attainment(self, since_s: float = 0.0, until_s: float = math.inf) -> float:
        """Fraction of the requests arriving in [since_s, until_s) that met both SLOs (1.0 when none)."""
        chosen = [r for r in self.requests if since_s <= r.arrival_s < until_s]
        return sum(r.meets(self.slo) for r in chosen) / len(chosen) if chosen else 1.0

    def summary(self) -> dict[str, Any]:
        ttft = [r.ttft_s * 1000 for r in self.requests]
        tokens = sum(r.output_tokens for r in self.requests)
        return {
            "requests": len(self.requests),
            "slo_attainment": self.attainment(),
            "ttft_ms_mean": sum(ttft) / len(ttft) if ttft else None,
            "ttft_ms_p90": percentile(ttft, 90) if ttft else None,
            "output_tokens_per_s": tokens / self.end_s if self.end_s > 0 else 0.0,
            "gpu_hours": self.gpu_hours,
            "end_s": self.end_s,
        }

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "slo": self.slo.model_dump(), "timeline": [asdict(p) for p in self.timeline],
                "requests": [asdict(r) for r in self.requests]}


@dataclass
class _Interval:
    arrivals: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)


def _percentiles_ms(samples: list[float]) -> dict[str, float]:
    return {name: percentile(samples, q) * 1000 for name, q in PERCENTILES.items()} if samples else {}


class Simulation:
    """One run; `run()` once."""

    def __init__(self, requests: Sequence[SimRequest], policy: AutoscalePolicy, profile: WorkerProfile,
                 params: SimParams = SimParams(), duration_s: float = 0.0) -> None:
        self.policy, self.profile, self.params = policy, profile, params
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.duration_s = max([duration_s] + [r.arrival_s for r in self.requests])
        self.planner = Planner(policy, profile)
        self.router = make_router(params.router_policy, 0)
        self.context: list[ContextWorker] = []
        self.generation: list[GenerationWorker] = []
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._interval = _Interval()
        self._flights: list[Flight] = []
        self._in_system = 0
        self.timeline: list[PlanPoint] = []

    def _at(self, t: float, kind: int, obj: Any = None) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, obj))

    def run(self) -> SimResult:
        pools = self.policy.pools
        for _ in range(pools.context.min_replicas):
            self._launch("context", 0.0, ready_s=0.0)
        for _ in range(pools.generation.min_replicas):
            self._launch("generation", 0.0, ready_s=0.0)
        for r in self.requests:
            self._at(r.arrival_s, _ARRIVE, r)
        self._at(self.policy.interval_s, _PLAN)
        now = 0.0
        handlers = {_ARRIVE: self._arrive, _PREFILLED: self._prefilled, _HANDED_OFF: self._handed_off,
                    _STEPPED: self._stepped, _READY: self._ready, _PLAN: self._plan}
        while self._events:
            now, _, kind, obj = heapq.heappop(self._events)
            if kind == _PLAN and self._in_system == 0 and now >= self.duration_s:
                break
            handlers[kind](now, obj)
        end = max([self.duration_s] + [f.done_s for f in self._flights])
        gpu_s = sum(w.gpu_seconds(end) for w in [*self.context, *self.generation])
        results = [RequestResult(f.arrival_s, f.prompt_tokens, f.output_tokens, f.first_token_s - f.arrival_s,
                                 f.gap_sum / f.gaps if f.gaps else None, f.done_s) for f in self._flights]
        return SimResult(self.policy.slo, self.timeline, results, gpu_s / 3600, end)

    # -- workers ---------------------------------------------------------------------------------
    def _launch(self, role: str, now: float, ready_s: float) -> None:
        pools, profile, params = self.policy.pools, self.profile, self.params
        wid = f"{role[0]}{next(self._ids):05d}"
        if role == "context":
            self.context.append(ContextWorker(wid, now, ready_s, pools.context.gpus_per_replica, profile.prefill_tokens_per_s))
        else:
            full_step = profile.max_concurrent_seqs / profile.decode_tokens_per_s
            self.generation.append(GenerationWorker(wid, now, ready_s, pools.generation.gpus_per_replica,
                                                    profile.max_concurrent_seqs, full_step, params.decode_fixed_fraction))
        if ready_s > now:
            self._at(ready_s, _READY, (self.context if role == "context" else self.generation)[-1])

    def _ready(self, now: float, worker: Worker) -> None:
        if worker.state is State.STARTING:
            worker.state = State.SERVING

    def _resize(self, workers: Sequence[Worker], role: str, target: int, now: float) -> None:
        kept = [w for w in workers if w.state in (State.STARTING, State.SERVING)]
        for _ in range(target - len(kept)):
            self._launch(role, now, now + self.params.startup_s)
        # still-starting first (newest first), then the least busy serving worker
        order = sorted(kept, key=lambda w: (w.state is State.SERVING, w.busy(), -w.launched_s, w.worker_id))
        for w in order[: max(len(kept) - target, 0)]:
            w.state = State.DRAINING
            w.stop_if_drained(now)

    @staticmethod
    def _serving(workers: Sequence[Worker]) -> int:
        return sum(w.state is State.SERVING for w in workers)

    # -- a request's path ------------------------------------------------------------------------
    def _arrive(self, now: float, r: SimRequest) -> None:
        flight = Flight(r.arrival_s, r.prompt_tokens, r.output_tokens)
        self._flights.append(flight)
        self._in_system += 1
        self._interval.arrivals += 1
        self._interval.prompt_tokens += r.prompt_tokens
        loads = [w.load(now) for w in self.context if w.state is State.SERVING]
        loads += [w.load() for w in self.generation if w.state is State.SERVING]
        route = self.router.route(r.prompt_tokens, {}, loads, r.prompt_tokens)  # block = one sequence's KV
        gen = next(w for w in self.generation if w.worker_id == route.generation_worker)
        flight.generation = gen
        gen.inbound += 1
        if route.context_worker is None:  # no context worker serving: the generation worker prefills
            flight.first_token_s = flight.last_token_s = now + r.prompt_tokens / self.profile.prefill_tokens_per_s
            self._first_token(flight)
            self._at(flight.first_token_s, _HANDED_OFF, flight)
            return
        ctx = next(w for w in self.context if w.worker_id == route.context_worker)
        ctx.queue.append(flight)
        self._start_prefill(ctx, now)

    def _start_prefill(self, ctx: ContextWorker, now: float) -> None:
        done = ctx.start_next(now)
        if done is not None:
            self._at(done, _PREFILLED, ctx)

    def _first_token(self, flight: Flight) -> None:
        self._interval.ttft_s.append(flight.first_token_s - flight.arrival_s)

    def _prefilled(self, now: float, ctx: ContextWorker) -> None:
        flight = ctx.current
        assert flight is not None
        ctx.current = None
        flight.first_token_s = flight.last_token_s = now
        self._first_token(flight)
        self._at(now + self.params.transfer_s(flight.prompt_tokens), _HANDED_OFF, flight)
        self._start_prefill(ctx, now)
        ctx.stop_if_drained(now)

    def _handed_off(self, now: float, flight: Flight) -> None:
        gen = flight.generation
        assert gen is not None
        gen.inbound -= 1
        if flight.left == 0:  # a single output token: done at the first
            self._finish(flight, flight.first_token_s)
            gen.stop_if_drained(now)
            return
        gen.waiting.append(flight)
        if not gen.stepping:
            self._start_step(gen, now)

    def _start_step(self, gen: GenerationWorker, now: float) -> None:
        done = gen.start_step(now)
        if done is not None:
            self._at(done, _STEPPED, gen)

    def _stepped(self, now: float, gen: GenerationWorker) -> None:
        for flight in gen.finish_step(now, self._interval.itl_s):
            self._finish(flight, now)
        self._start_step(gen, now)
        gen.stop_if_drained(now)

    def _finish(self, flight: Flight, now: float) -> None:
        flight.done_s = now
        self._in_system -= 1
        self._interval.finished += 1
        self._interval.output_tokens += flight.output_tokens

    # -- the planner -----------------------------------------------------------------------------
    def _plan(self, now: float, _: Any = None) -> None:
        obs = self._observe(now)
        decision = self.planner.decide(obs, now)
        if decision.action is not Action.HOLD:
            self._resize(self.context, "context", decision.context_replicas, now)
            self._resize(self.generation, "generation", decision.generation_replicas, now)
        self.timeline.append(PlanPoint(now, obs.context_replicas, obs.generation_replicas, decision.context_replicas,
                                       decision.generation_replicas, decision.action.value, decision.reason))
        self._at(now + self.policy.interval_s, _PLAN)

    def _observe(self, now: float) -> Observation:
        i, self._interval = self._interval, _Interval()
        serving_gen = [w for w in self.generation if w.state is State.SERVING]
        seqs = sum(len(w.running) + len(w.waiting) for w in serving_gen)
        capacity = sum(w.capacity for w in serving_gen)
        return Observation(
            context_replicas=self._serving(self.context),
            generation_replicas=self._serving(self.generation),
            arrival_rate=i.arrivals / self.policy.interval_s,
            mean_prompt_tokens=i.prompt_tokens / i.arrivals if i.arrivals else 0.0,
            mean_output_tokens=i.output_tokens / i.finished if i.finished else 0.0,  # known once finished, as in serving
            queued_prefill_tokens=sum(w.queued_tokens(now) for w in self.context if w.state is not State.STOPPED),
            running_seqs=seqs,
            context_kv_usage=0.0,  # a context worker holds one prompt's KV until its hand-off: negligible here
            generation_kv_usage=min(1.0, seqs / capacity) if capacity else 0.0,
            ttft_ms=_percentiles_ms(i.ttft_s),
            itl_ms=_percentiles_ms(i.itl_s),
        )


def simulate(requests: Sequence[SimRequest], policy: AutoscalePolicy, profile: WorkerProfile,
             params: SimParams = SimParams(), duration_s: float = 0.0) -> SimResult:
    return Simulation(requests, policy, profile, params, duration_s).run()


def format_report(result: SimResult) -> str:
    lines = [f"{'t (s)':>8} {'ctx':>4} {'gen':>4}  {'->ctx':>5} {'->gen':>5}  action"]
    for p in result.timeline:
        lines.append(f"{p.t:8.0f} {p.context_serving:4d} {p.generation_serving:4d}  {p.context_replicas:5d} "
                     f"{p.generation_replicas:5d}  " + (p.reason if p.action != "hold" else "hold"))
    s = result.summary()
    fmt = (lambda v: "-" if v is None else f"{v:.0f}")
    lines += [
        "",
        f"requests            {s['requests']} over {s['end_s']:.0f} s",
        f"SLO attainment      {s['slo_attainment']:.1%} (TTFT <= {result.slo.ttft_ms:g} ms and mean ITL <= {result.slo.itl_ms:g} ms)",
        f"TTFT mean / p90     {fmt(s['ttft_ms_mean'])} / {fmt(s['ttft_ms_p90'])} ms",
        f"throughput          {s['output_tokens_per_s']:.0f} output tok/s",
        f"GPU-hours           {s['gpu_hours']:.3f}",
    ]
    return "\n".join(lines)
