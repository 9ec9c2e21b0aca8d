"""The planner on synthetic observation sequences: step up, step down, steady noise, bounds, reasons.

`observe` is a toy deployment: latency grows with each pool's utilization of its profiled capacity
(TTFT queues like M/M/1 behind a 200 ms prefill; ITL reaches the SLO at full decode load), and
running sequences follow Little's law. It is only as accurate as these tests need.
"""
from __future__ import annotations

import random

import pytest

from tandem.orchestrator.autoscale_policy import AutoscalePolicy
from tandem.orchestrator.planner import Action, Decision, Planner
from tandem.orchestrator.planner_load import LoadPredictor, Observation, WorkerProfile

PROFILE = WorkerProfile(prefill_tokens_per_s=10_000, decode_tokens_per_s=2_000, max_concurrent_seqs=64)
POLICY = AutoscalePolicy(
    max_gpus=64,
    pools={"context": {"max_replicas": 16}, "generation": {"max_replicas": 16}},
    slo={"ttft_ms": 1000, "itl_ms": 40},
)
PROMPT, OUTPUT, INTERVAL = 2000, 200, POLICY.interval_s


def observe(c: int, g: int, rate: float, prompt: float = PROMPT, output: float = OUTPUT) -> Observation:
    prefill_util = rate * prompt / (c * PROFILE.prefill_tokens_per_s)
    decode_util = rate * output / (g * PROFILE.decode_tokens_per_s)
    ttft = 200 + 200 * min(prefill_util, 0.99) / (1 - min(prefill_util, 0.99))
    itl = 30 + 10 * min(decode_util, 2.0)
    running = int(rate * output * itl / 1000)
    return Observation(
        context_replicas=c,
        generation_replicas=g,
        arrival_rate=rate,
        mean_prompt_tokens=prompt,
        mean_output_tokens=output,
        queued_prefill_tokens=int(max(0.0, rate * prompt - c * PROFILE.prefill_tokens_per_s) * INTERVAL),
        running_seqs=running,
        context_kv_usage=min(1.0, 0.5 * prefill_util),
        generation_kv_usage=min(1.0, running / (g * PROFILE.max_concurrent_seqs)),
        ttft_ms={"p90": ttft},
        itl_ms={"p90": itl},
    )


def covers(c: int, g: int, rate: float) -> bool:
    """The pair serves `rate` within the planner's target utilization (prefill, decode and concurrency)."""
    util = POLICY.target_utilization
    seqs = rate * OUTPUT * POLICY.slo.itl_ms / 1000
    return (
        c * PROFILE.prefill_tokens_per_s * util >= rate * PROMPT
        and g * PROFILE.decode_tokens_per_s * util >= rate * OUTPUT
        and g * PROFILE.max_concurrent_seqs * util >= seqs
    )


def run(planner: Planner, rates: list[float], start: tuple[int, int] = (1, 1), t0: float = 0.0) -> list[Decision]:
    """Feed one observation per interval, applying every decision; the i-th decision answers rates[i]."""
    c, g = start
    decisions = []
    for i, rate in enumerate(rates):
        decision = planner.decide(observe(c, g, rate), t0 + i * INTERVAL)
        c, g = decision.context_replicas, decision.generation_replicas
        decisions.append(decision)
    return decisions


def test_a_step_up_is_covered_within_three_intervals_and_stays_covered() -> None:
    planner = Planner(POLICY, PROFILE)
    decisions = run(planner, [4.0] * 10 + [12.0] * 20)
    assert covers(decisions[9].context_replicas, decisions[9].generation_replicas, 4.0)
    assert not covers(decisions[9].context_replicas, decisions[9].generation_replicas, 12.0)
    for d in decisions[12:]:
        assert covers(d.context_replicas, d.generation_replicas, 12.0), d.reason
    assert any(d.action is Action.SCALE_UP and "prefill" in d.reason for d in decisions[10:13])


def test_a_step_down_waits_for_the_cooldown_and_never_bounces() -> None:
    planner = Planner(POLICY, PROFILE)
    decisions = run(planner, [12.0] * 15 + [3.0] * 25)
    before = (decisions[14].context_replicas, decisions[14].generation_replicas)
    counts = [(d.context_replicas, d.generation_replicas) for d in decisions[14:]]
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(counts, counts[1:])), counts  # monotone: no bounce
    changes = [i for i, (a, b) in enumerate(zip(counts, counts[1:]), start=15) if a != b]
    assert changes, "never scaled down"
    last_up = max(i for i, d in enumerate(decisions[:15]) if d.action is not Action.HOLD)
    for first, second in zip([last_up] + changes, changes):
        assert (second - first) * INTERVAL >= POLICY.scale_down_cooldown_s
    final = counts[-1]
    assert final[0] < before[0] and covers(*final, 3.0)
    assert all(d.action in (Action.HOLD, Action.SCALE_DOWN) for d in decisions[15:])
    assert any("cooldown" in d.reason for d in decisions[15:])


@pytest.mark.parametrize("rate", [1.0, 3.7, 5.0, 8.1, 12.5, 19.9])
def test_steady_noisy_load_keeps_the_counts_constant(rate: float) -> None:
    rng = random.Random(int(rate * 10))
    planner = Planner(POLICY, PROFILE)
    noisy = [rate * rng.uniform(0.95, 1.05) for _ in range(70)]
    decisions = run(planner, noisy)
    settled = {(d.context_replicas, d.generation_replicas) for d in decisions[20:]}
    assert len(settled) == 1, [d.reason for d in decisions[20:] if d.action is not Action.HOLD]
    assert covers(*settled.pop(), rate * 1.05)


POLICIES = [
    POLICY,
    AutoscalePolicy(max_gpus=12, pools={"context": {"max_replicas": 10, "gpus_per_replica": 2}}, pd_ratio={"min": 0.5, "max": 2}),
    AutoscalePolicy(
        throughput_target_tokens_per_s=30_000,
        pools={"context": {"min_replicas": 2, "max_replicas": 6}, "generation": {"min_replicas": 3, "max_replicas": 9}},
        pd_ratio={"min": 0.5, "max": 1},
        scale_up_cooldown_s=0,
        scale_down_cooldown_s=0,
    ),
]


@pytest.mark.parametrize("policy", POLICIES, ids=["default", "cost_cap_and_ratio", "throughput_target"])
def test_bounds_ratio_and_cost_always_hold(policy: AutoscalePolicy) -> None:
    rng = random.Random(7)
    planner = Planner(policy, PROFILE)
    c, g, now = 1, 1, 0.0
    for _ in range(400):
        if rng.random() < 0.1:  # a worker died, or an operator changed counts by hand
            c, g = rng.randint(0, 20), rng.randint(0, 20)
        obs = observe(max(c, 1), max(g, 1), rng.uniform(0, 60), rng.uniform(10, 8000), rng.uniform(1, 2000))
        obs = Observation(**{**{f: getattr(obs, f) for f in obs.__slots__}, "context_replicas": c, "generation_replicas": g})
        now += rng.choice([1.0, INTERVAL, 10 * INTERVAL])
        d = planner.decide(obs, now)
        assert policy.allows(d.context_replicas, d.generation_replicas), d.reason
        assert d.reason and d.reason.startswith(d.action.value)
        c, g = d.context_replicas, d.generation_replicas


def test_reasons_name_the_quantity_that_drove_them() -> None:
    planner = Planner(POLICY, PROFILE)
    slow = observe(2, 2, 1.0)
    slow = Observation(**{**{f: getattr(slow, f) for f in slow.__slots__}, "ttft_ms": {"p90": 3000.0}})
    d = planner.decide(slow, 0.0)
    assert d.action is Action.SCALE_UP and d.context_replicas > 2 and "TTFT p90 3000 ms > SLO 1000 ms" in d.reason

    d = Planner(POLICY, PROFILE).decide(observe(1, 1, 1.0), 0.0)
    assert d.action is Action.HOLD and d.reason.startswith("hold: context 1, generation 1") and "hysteresis" in d.reason

    crowded = Observation(2, 1, 1.0, 100, 1000, running_seqs=200)
    d = Planner(POLICY, PROFILE).decide(crowded, 0.0)
    assert d.generation_replicas > 1 and "generation needs" in d.reason and "concurrency 200 seqs" in d.reason

    backlog = Observation(1, 1, 1.0, 1000, 10, queued_prefill_tokens=3_000_000)
    d = Planner(POLICY, PROFILE).decide(backlog, 0.0)
    assert d.context_replicas > 1 and "3000000 queued tokens" in d.reason


def test_a_scale_up_inside_the_cooldown_is_held_and_says_so() -> None:
    policy = POLICY.model_copy(update={"scale_up_cooldown_s": 120})
    planner = Planner(policy, PROFILE)
    first = planner.decide(observe(1, 1, 8.0), 0.0)
    assert first.action is Action.SCALE_UP
    held = planner.decide(observe(first.context_replicas, first.generation_replicas, 20.0), 60.0)
    assert held.action is Action.HOLD and "cooldown" in held.reason and "60 s more" in held.reason
    later = planner.decide(observe(first.context_replicas, first.generation_replicas, 20.0), 120.0)
    assert later.action is Action.SCALE_UP


def test_under_a_cost_cap_both_pools_serve_the_same_fraction() -> None:
    policy = AutoscalePolicy(max_gpus=10, pools={"context": {"max_replicas": 16}, "generation": {"max_replicas": 16}})
    planner = Planner(policy, PROFILE)
    obs = observe(1, 1, 100.0)
    d = planner.decide(obs, 0.0)
    assert d.context_replicas + d.generation_replicas == 10 and "max_gpus" in d.reason
    forecast = LoadPredictor().update(obs)
    need_c = planner.context_need(obs, forecast, forecast.arrival_rate).replicas
    need_g = planner.generation_need(obs, forecast, forecast.arrival_rate).replicas
    assert abs(d.context_replicas / need_c - d.generation_replicas / need_g) < 1 / min(need_c, need_g)


def test_a_throughput_target_caps_the_load_sized_for() -> None:
    policy = POLICY.model_copy(update={"max_gpus": None, "throughput_target_tokens_per_s": 22_000.0})
    d = Planner(policy, PROFILE).decide(Observation(1, 1, 100.0, PROMPT, OUTPUT), 0.0)
    assert "capped at throughput_target_tokens_per_s 22000" in d.reason and "load 10.00 req/s" in d.reason
    assert covers(d.context_replicas, d.generation_replicas, 10.0) and not covers(d.context_replicas, d.generation_replicas, 14.0)


def test_the_predictor_anticipates_a_rise_but_not_a_fall() -> None:
    predictor = LoadPredictor(alpha=0.5, beta=0.3)
    for rate in [10.0] * 5:
        forecast = predictor.update(Observation(1, 1, rate, 100, 10))
    assert forecast.arrival_rate == pytest.approx(10.0) and forecast.trend == pytest.approx(0.0)
    for rate in [12.0, 14.0, 16.0]:
        forecast = predictor.update(Observation(1, 1, rate, 100, 10))
        assert forecast.arrival_rate >= rate and forecast.trend > 0
    dip = predictor.update(Observation(1, 1, 4.0, 50, 5))
    assert dip.arrival_rate > 4.0 and dip.prompt_tokens > 50  # one low interval releases only part of the level


def test_a_worker_profile_reads_its_json_and_names_bad_keys() -> None:
    profile = WorkerProfile.from_json('{"prefill_tokens_per_s": 9000, "decode_tokens_per_s": 1500.5, "max_concurrent_seqs": 48}')
    assert profile == WorkerProfile(9000, 1500.5, 48)
    with pytest.raises(ValueError, match="missing key 'max_concurrent_seqs'"):
        WorkerProfile.from_dict({"prefill_tokens_per_s": 1, "decode_tokens_per_s": 1})
    with pytest.raises(ValueError, match="unknown key 'decode_tok_s'"):
        WorkerProfile.from_dict({"prefill_tokens_per_s": 1, "decode_tok_s": 1, "max_concurrent_seqs": 1})
    with pytest.raises(ValueError, match="decode_tokens_per_s must be a positive number"):
        WorkerProfile(1, -2, 1)
    with pytest.raises(ValueError, match="max_concurrent_seqs must be an integer"):
        WorkerProfile(1, 1, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        WorkerProfile.from_json("{")
    with pytest.raises(ValueError, match="generation_kv_usage must be within"):
        Observation(1, 1, 1.0, 1, 1, generation_kv_usage=1.5)
