"""The production planner and router on the discrete-event simulator: step up, step down, steady load, bounds, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.orchestrator.autoscale_policy import AutoscalePolicy
from tandem.orchestrator.cli import main
from tandem.orchestrator.planner_load import WorkerProfile
from tandem.orchestrator.sim_cluster import SimParams
from tandem.orchestrator.sim_workload import SimRequest, TraceError, load_trace, poisson_requests
from tandem.orchestrator.simulator import SimResult, simulate

PROFILE = WorkerProfile(prefill_tokens_per_s=10_000, decode_tokens_per_s=2_000, max_concurrent_seqs=64)
POLICY = AutoscalePolicy(
    max_gpus=32,
    pools={"context": {"max_replicas": 8}, "generation": {"max_replicas": 8}},
    slo={"ttft_ms": 1000, "itl_ms": 40},
    interval_s=10, scale_up_cooldown_s=10, scale_down_cooldown_s=30,
)
PARAMS = SimParams(startup_s=20)
PROMPT, OUTPUT = 1000, 100
STEP_AT, FALL_AT, END = 60.0, 300.0, 480.0


def run(schedule: list[tuple[float, float]], policy: AutoscalePolicy = POLICY, seed: int = 1) -> SimResult:
    return simulate(poisson_requests(schedule, END, PROMPT, OUTPUT, seed), policy, PROFILE, PARAMS, END)


@pytest.fixture(scope="module")
def step_result() -> SimResult:
    return run([(0, 2), (STEP_AT, 20), (FALL_AT, 2)])


def test_a_step_up_scales_within_two_intervals_and_meets_the_slos_after_the_ramp(step_result: SimResult) -> None:
    ups = [p for p in step_result.timeline if p.t > STEP_AT and p.action == "scale up"]
    assert ups and ups[0].t <= STEP_AT + 2 * POLICY.interval_s
    assert step_result.attainment(0, STEP_AT) >= 0.99
    ramp = STEP_AT + PARAMS.startup_s + 7 * POLICY.interval_s  # decision, start-up, then the backlog drains
    assert step_result.attainment(ramp, FALL_AT) >= 0.9
    assert step_result.attainment(FALL_AT + 30, END) >= 0.99


def test_when_load_falls_the_pools_shrink_monotonically_to_the_minimum(step_result: SimResult) -> None:
    after = [p for p in step_result.timeline if p.t > FALL_AT]
    pairs = [(p.context_replicas, p.generation_replicas) for p in after]
    assert all(b[0] <= a[0] and b[1] <= a[1] for a, b in zip(pairs, pairs[1:])), pairs
    assert pairs[-1] == (1, 1)
    assert step_result.gpu_hours < 8 * 2 * END / 3600  # far below max_replicas all the time


def test_steady_load_settles_and_then_holds() -> None:
    result = run([(0, 10)])  # needs 1.25 context, 0.78 generation workers: clear of the hysteresis band
    late = [(p.context_replicas, p.generation_replicas) for p in result.timeline if 150 <= p.t <= END]
    assert len(set(late)) == 1, late
    assert result.attainment(150, END) >= 0.95


@pytest.mark.parametrize(
    "policy",
    [
        POLICY,
        AutoscalePolicy(max_gpus=6, pools={"context": {"max_replicas": 8}, "generation": {"max_replicas": 8, "min_replicas": 2}},
                        pd_ratio={"min": 0.5, "max": 1.5}, interval_s=10, scale_up_cooldown_s=10, scale_down_cooldown_s=30),
        AutoscalePolicy(throughput_target_tokens_per_s=15_000, pools={"generation": {"gpus_per_replica": 2}},
                        pd_ratio={"max": 3}, interval_s=10, scale_up_cooldown_s=0, scale_down_cooldown_s=0, hysteresis=0),
    ],
)
def test_bounds_ratio_and_cost_hold_at_every_point(policy: AutoscalePolicy) -> None:
    result = run([(0, 2), (STEP_AT, 20), (FALL_AT, 2)], policy)
    ctx, gen = policy.pools.context, policy.pools.generation
    for p in result.timeline:
        assert policy.allows(p.context_replicas, p.generation_replicas), p
        assert ctx.min_replicas <= p.context_serving <= ctx.max_replicas, p
        assert gen.min_replicas <= p.generation_serving <= gen.max_replicas, p
    assert all(r.done_s >= r.arrival_s for r in result.requests)  # every request finished


def test_a_seed_gives_the_same_run() -> None:
    a, b = run([(0, 5)], seed=3), run([(0, 5)], seed=3)
    assert a.to_json() == b.to_json()
    assert run([(0, 5)], seed=4).requests != a.requests


def test_latencies_follow_the_performance_model() -> None:
    params = SimParams(startup_s=0, kv_bytes_per_token=100_000, kv_bandwidth_gb_s=1.0, decode_fixed_fraction=0.5)
    result = simulate([SimRequest(0.0, 1000, 11)], POLICY, PROFILE, params)
    (r,) = result.requests
    step = 64 / 2000 * (0.5 + 0.5 / 64)  # one sequence in the batch
    assert r.ttft_s == pytest.approx(0.1)  # 1000 tokens at 10k tok/s, no queue
    assert r.mean_itl_s == pytest.approx((0.1 + 10 * step) / 10)  # the first gap carries the 0.1 s hand-off
    assert r.done_s == pytest.approx(0.1 + 0.1 + 10 * step)


def test_a_trace_loads_sorted_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "t.jsonl"
    good.write_text('{"t": 2, "prompt_tokens": 5, "output_tokens": 3}\n\n{"t": 1, "prompt_tokens": 7, "output_tokens": 1}\n')
    assert [r.arrival_s for r in load_trace(good)] == [1.0, 2.0]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"t": 1, "prompt_tokens": 0, "output_tokens": 1}\n')
    with pytest.raises(TraceError, match="line 1.*prompt_tokens"):
        load_trace(bad)


def test_plan_simulate_prints_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text("max_gpus: 8\ninterval_s: 5\nslo: {ttft_ms: 1000, itl_ms: 50}\n")
    (tmp_path / "profile.json").write_text(json.dumps(
        {"prefill_tokens_per_s": 10000, "decode_tokens_per_s": 2000, "max_concurrent_seqs": 64}))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"t": i * 0.5, "prompt_tokens": 500, "output_tokens": 20}) + "\n" for i in range(30)))
    out = tmp_path / "out.json"
    base = ["plan", "--simulate", "--policy", str(tmp_path / "policy.yaml"), "--profile", str(tmp_path / "profile.json")]
    assert main(base + ["--trace", str(trace), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SLO attainment" in printed and "GPU-hours" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["requests"] == 30 and data["timeline"] and data["summary"]["slo_attainment"] == 1.0
    assert main(base + ["--rate", "0:1,10:3", "--duration", "20", "--prompt-tokens", "200", "--output-tokens", "10"]) == 0
    assert main(base + ["--rate", "1"]) == 2  # no --duration
    assert "needs --duration" in capsys.readouterr().err
