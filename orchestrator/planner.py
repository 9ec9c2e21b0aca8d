"""The planner: how many context and generation workers the next interval needs. Pure: no I/O, no clock.

Life cycle: one `Planner` per deployment, built from the validated policy and a worker profile.
Every `policy.interval_s` the caller measures an `Observation`, calls `decide(observation, now)`
(`now`: monotonic seconds), applies the returned replica counts and logs `Decision.reason`. The
planner assumes its decisions are applied: a decision that changes a count starts the cooldowns.
It starts from the counts the observation reports (the workers actually serving), so a worker that
died is replaced like any other shortfall.

One decision:
1. forecast the next interval's load (`LoadPredictor`); a throughput target caps it;
2. each pool's need in fractional workers, the largest of its terms: context from prefill tokens/s
   (plus draining the queued prompt tokens within one interval), KV usage and measured TTFT over
   the SLO; generation from decode tokens/s, concurrent sequences, KV usage and measured ITL over
   the SLO. Both pools are sized from the same forecast request rate (rate matching);
3. the cheapest pair within min/max, pd_ratio and max_gpus that serves the largest fraction of the
   load; under a cap both pools serve the same fraction, so neither idles waiting on the other;
4. scale up when the current pair serves less than that; scale down only when the need, inflated
   by 1 / (1 - hysteresis), fits a smaller pair and measured latency has that much headroom; the
   cooldowns hold any change made too soon after the last one, except a move back inside the
   policy (counts below min_replicas after a worker died, or outside pd_ratio / max_gpus).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from tandem.orchestrator.autoscale_policy import AutoscalePolicy
from tandem.orchestrator.planner_load import Forecast, LoadPredictor, Observation, WorkerProfile

_EPS = 1e-9
MAX_LATENCY_CORRECTION = 2.0  # measured latency over the SLO asks for at most this factor more workers per decision


class Action(enum.Enum):
    HOLD = "hold"
    SCALE_UP = "scale up"
    SCALE_DOWN = "scale down"
    REBALANCE = "rebalance"  # one pool grows while the other shrinks


@dataclass(frozen=True, slots=True)
class Decision:
    context_replicas: int
    generation_replicas: int
    reason: str  # one human-readable line: the counts, the load, each pool's need and what drove it
    action: Action


@dataclass(frozen=True, slots=True)
class PoolNeed:
    replicas: float  # fractional workers
    driver: str  # the term that set it, e.g. "prefill 12600 tok/s"


@dataclass(frozen=True, slots=True)
class _Pair:
    context: int
    generation: int
    served: float  # fraction of the needs this pair covers, at most 1


def _served(context: int, generation: int, need_c: float, need_g: float) -> float:
    return min(1.0, context / need_c if need_c > 0 else math.inf, generation / need_g if need_g > 0 else math.inf)


def best_pair(policy: AutoscalePolicy, need_c: float, need_g: float) -> _Pair:
    """The cheapest allowed pair among those that serve the largest fraction of the needs."""
    best: tuple[float, float, int, int] | None = None
    ctx = policy.pools.context
    for c in range(ctx.min_replicas, ctx.max_replicas + 1):
        allowed = policy.generation_range(c)
        if not allowed:
            continue
        share = min(1.0, c / need_c) if need_c > 0 else 1.0
        g = min(max(math.ceil(need_g * share - _EPS), allowed.start), allowed.stop - 1)
        key = (-round(_served(c, g, need_c, need_g), 9), policy.gpus(c, g), c, g)
        if best is None or key < best:
            best = key
    assert best is not None, "the policy schema guarantees an allowed pair"
    return _Pair(best[2], best[3], -best[0])


def _latency_term(measured: float | None, slo_ms: float, current: int, what: str) -> PoolNeed | None:
    if measured is None or measured <= slo_ms:
        return None
    factor = min(measured / slo_ms, MAX_LATENCY_CORRECTION)
    return PoolNeed(max(current * factor, current + 1), f"{what} {measured:.0f} ms > SLO {slo_ms:.0f} ms")


class Planner:
    """Decides the two pools' sizes once per interval; holds the forecast state and the last change time."""

    def __init__(self, policy: AutoscalePolicy, profile: WorkerProfile, predictor: LoadPredictor | None = None) -> None:
        self.policy = policy
        self.profile = profile
        self._predictor = predictor or LoadPredictor()
        self._last_change: float | None = None

    def decide(self, obs: Observation, now: float) -> Decision:
        forecast = self._predictor.update(obs)
        rate, capped = self._capped_rate(forecast)
        need_c, need_g = self.context_need(obs, forecast, rate), self.generation_need(obs, forecast, rate)
        current = (obs.context_replicas, obs.generation_replicas)
        target, note = self._target(obs, need_c, need_g)
        load = f"load {rate:.2f} req/s x ({forecast.prompt_tokens:.0f} prompt + {forecast.output_tokens:.0f} output) tok"
        if capped:
            load += f" (capped at throughput_target_tokens_per_s {self.policy.throughput_target_tokens_per_s:g})"
        needs = f"context needs {need_c.replicas:.2f} ({need_c.driver}), generation needs {need_g.replicas:.2f} ({need_g.driver})"
        if target == current:
            return Decision(*current, f"hold: context {current[0]}, generation {current[1]}; {load}; {needs}; {note}", Action.HOLD)
        grows, shrinks = target[0] > current[0] or target[1] > current[1], target[0] < current[0] or target[1] < current[1]
        action = Action.REBALANCE if grows and shrinks else Action.SCALE_UP if grows else Action.SCALE_DOWN
        change = f"context {current[0]}->{target[0]}, generation {current[1]}->{target[1]}"
        cooldown = self.policy.scale_up_cooldown_s if grows else self.policy.scale_down_cooldown_s
        since = math.inf if self._last_change is None else now - self._last_change
        if since < cooldown - _EPS and self.policy.allows(*current):  # counts outside the policy are corrected at once
            left = cooldown - since
            return Decision(
                *current, f"hold: {action.value} to {change} waits {left:.0f} s more of cooldown; {load}; {needs}", Action.HOLD
            )
        self._last_change = now
        return Decision(*target, f"{action.value}: {change}; {load}; {needs}; {note}", action)

    def _capped_rate(self, forecast: Forecast) -> tuple[float, bool]:
        target = self.policy.throughput_target_tokens_per_s
        tokens = forecast.arrival_rate * (forecast.prompt_tokens + forecast.output_tokens)
        if target is None or tokens <= target:
            return forecast.arrival_rate, False
        return forecast.arrival_rate * target / tokens, True

    def context_need(self, obs: Observation, forecast: Forecast, rate: float) -> PoolNeed:
        util, slo = self.policy.target_utilization, self.policy.slo
        prefill = rate * forecast.prompt_tokens + obs.queued_prefill_tokens / self.policy.interval_s
        terms = [
            PoolNeed(prefill / (self.profile.prefill_tokens_per_s * util), f"prefill {prefill:.0f} tok/s"),
            PoolNeed(obs.context_replicas * obs.context_kv_usage / util, f"context KV usage {obs.context_kv_usage:.0%}"),
        ]
        if obs.queued_prefill_tokens:
            terms[0] = PoolNeed(terms[0].replicas, terms[0].driver + f" incl. {obs.queued_prefill_tokens} queued tokens")
        ttft = _latency_term(obs.ttft_ms.get(slo.ttft_percentile), slo.ttft_ms, obs.context_replicas, f"TTFT {slo.ttft_percentile}")
        return max(terms + ([ttft] if ttft else []), key=lambda need: need.replicas)

    def generation_need(self, obs: Observation, forecast: Forecast, rate: float) -> PoolNeed:
        util, slo, profile = self.policy.target_utilization, self.policy.slo, self.profile
        decode = rate * forecast.output_tokens
        seqs = max(decode * slo.itl_ms / 1000, obs.running_seqs)  # Little's law: each sequence emits a token per ITL
        terms = [
            PoolNeed(decode / (profile.decode_tokens_per_s * util), f"decode {decode:.0f} tok/s"),
            PoolNeed(seqs / (profile.max_concurrent_seqs * util), f"concurrency {seqs:.0f} seqs"),
            PoolNeed(obs.generation_replicas * obs.generation_kv_usage / util, f"generation KV usage {obs.generation_kv_usage:.0%}"),
        ]
        itl = _latency_term(obs.itl_ms.get(slo.itl_percentile), slo.itl_ms, obs.generation_replicas, f"ITL {slo.itl_percentile}")
        return max(terms + ([itl] if itl else []), key=lambda need: need.replicas)

    def _target(self, obs: Observation, need_c: PoolNeed, need_g: PoolNeed) -> tuple[tuple[int, int], str]:
        """The pair to move to (before cooldowns) and a note on why; `current` when nothing should change."""
        policy, current = self.policy, (obs.context_replicas, obs.generation_replicas)
        up = best_pair(policy, need_c.replicas, need_g.replicas)
        limit = "" if up.served >= 1 - _EPS else f"; limits (max_replicas, pd_ratio, max_gpus) serve only {up.served:.0%} of it"
        allowed = policy.allows(*current)
        if not allowed or _served(*current, need_c.replicas, need_g.replicas) < up.served - _EPS:
            keep = (max(up.context, current[0]), max(up.generation, current[1]))
            why = "current counts outside the policy bounds" if not allowed else "need exceeds capacity"
            return (keep if policy.allows(*keep) else (up.context, up.generation)), why + limit
        h = policy.hysteresis
        down = best_pair(policy, need_c.replicas / (1 - h), need_g.replicas / (1 - h))
        target = [min(down.context, current[0]), min(down.generation, current[1])]
        blocked = []
        slo = policy.slo
        for i, (pool, measured, bound) in enumerate(
            (
                (f"TTFT {slo.ttft_percentile}", obs.ttft_ms.get(slo.ttft_percentile), slo.ttft_ms),
                (f"ITL {slo.itl_percentile}", obs.itl_ms.get(slo.itl_percentile), slo.itl_ms),
            )
        ):
            if target[i] < current[i] and measured is not None and measured > (1 - h) * bound:
                target[i] = current[i]
                blocked.append(f"{pool} {measured:.0f} ms lacks {h:.0%} headroom under SLO {bound:.0f} ms")
        if tuple(target) == current or not policy.allows(*target):
            band = f"within hysteresis {h:.0%}: a pool shrinks once its need fits (1 - {h:g}) of a smaller pool"
            return current, "; ".join([band] + blocked) + limit
        return (target[0], target[1]), f"need fits {1 - h:.0%} of the smaller pools" + limit
