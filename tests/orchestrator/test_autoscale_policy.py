"""The autoscaling policy YAML schema: defaults, a full round trip, and every bad field named with its path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tandem.orchestrator.autoscale_policy import AutoscalePolicy, AutoscalePolicyError, load_autoscale_policy


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(AutoscalePolicyError) as info:
        load_autoscale_policy(write(tmp_path, text))
    return str(info.value)


def test_a_budget_alone_means_every_other_default(tmp_path: Path) -> None:
    policy = load_autoscale_policy(write(tmp_path, "max_gpus: 16\n"))
    assert policy == AutoscalePolicy(max_gpus=16)
    assert policy.throughput_target_tokens_per_s is None and policy.max_gpus == 16
    ctx, gen = policy.pools.context, policy.pools.generation
    assert (ctx.min_replicas, ctx.max_replicas, ctx.gpus_per_replica) == (1, 8, 1.0) == (gen.min_replicas, gen.max_replicas, gen.gpus_per_replica)
    assert (policy.slo.ttft_ms, policy.slo.ttft_percentile, policy.slo.itl_ms, policy.slo.itl_percentile) == (1000, "p90", 50, "p90")
    assert (policy.interval_s, policy.scale_up_cooldown_s, policy.scale_down_cooldown_s) == (60, 60, 300)
    assert (policy.hysteresis, policy.target_utilization) == (0.2, 0.8)
    assert (policy.pd_ratio.min, policy.pd_ratio.max) == (0.0, None)


FULL = """
pools:
  context: {min_replicas: 2, max_replicas: 8, gpus_per_replica: 2}
  generation: {min_replicas: 1, max_replicas: 16, gpus_per_replica: 1}
slo:
  ttft_ms: 500
  ttft_percentile: p99
  itl_ms: 40
  itl_percentile: p95
throughput_target_tokens_per_s: 250000
interval_s: 30
scale_up_cooldown_s: 30
scale_down_cooldown_s: 600
hysteresis: 0.3
target_utilization: 0.7
pd_ratio: {min: 0.25, max: 2}
"""


def test_a_full_file_round_trips(tmp_path: Path) -> None:
    policy = load_autoscale_policy(write(tmp_path, FULL))
    assert policy.pools.context.min_replicas == 2 and policy.pools.context.gpus_per_replica == 2.0
    assert policy.pools.generation.max_replicas == 16
    assert (policy.slo.ttft_ms, policy.slo.ttft_percentile, policy.slo.itl_ms, policy.slo.itl_percentile) == (500, "p99", 40, "p95")
    assert policy.throughput_target_tokens_per_s == 250_000 and policy.max_gpus is None
    assert (policy.interval_s, policy.scale_up_cooldown_s, policy.scale_down_cooldown_s) == (30, 30, 600)
    assert (policy.hysteresis, policy.target_utilization, policy.pd_ratio.min, policy.pd_ratio.max) == (0.3, 0.7, 0.25, 2)
    dumped = write(tmp_path, yaml.safe_dump(policy.model_dump(mode="json")))
    assert load_autoscale_policy(dumped) == policy


@pytest.mark.parametrize(
    "text, expected",
    [
        ("max_gpus: 8\npools:\n  context:\n    max_replicass: 2\n",
         "policy.yaml: pools.context.max_replicass: Extra inputs are not permitted"),
        ("max_gpus: 8\nintervall_s: 5\n", "policy.yaml: intervall_s: Extra inputs are not permitted"),
        ("max_gpus: 8\npools:\n  generation: {min_replicas: 0}\n",
         "policy.yaml: pools.generation.min_replicas: Input should be greater than or equal to 1"),
        ("max_gpus: 8\npools:\n  context: {min_replicas: 4, max_replicas: 2}\n",
         "policy.yaml: pools.context.max_replicas: 2 is below min_replicas 4"),
        ("max_gpus: 8\nslo: {ttft_ms: 0}\n", "policy.yaml: slo.ttft_ms: Input should be greater than 0"),
        ("max_gpus: 8\nslo: {itl_percentile: p42}\n", "policy.yaml: slo.itl_percentile: Input should be 'p50', 'p90', 'p95' or 'p99'"),
        ("max_gpus: 8\ninterval_s: -1\n", "policy.yaml: interval_s: Input should be greater than 0"),
        ("max_gpus: 8\nscale_down_cooldown_s: -5\n", "policy.yaml: scale_down_cooldown_s: Input should be greater than or equal to 0"),
        ("max_gpus: 8\nhysteresis: 1\n", "policy.yaml: hysteresis: Input should be less than 1"),
        ("max_gpus: 8\ntarget_utilization: 1.5\n", "policy.yaml: target_utilization: Input should be less than or equal to 1"),
        ("max_gpus: 8\npd_ratio: {min: 2, max: 1}\n", "policy.yaml: pd_ratio.max: 1 is below min 2"),
        ("max_gpus: 0\n", "policy.yaml: max_gpus: Input should be greater than 0"),
        ("interval_s: 30\n", "policy.yaml: max_gpus: set exactly one budget"),
        ("max_gpus: 8\nthroughput_target_tokens_per_s: 1000\n",
         "policy.yaml: throughput_target_tokens_per_s: set exactly one budget: this or max_gpus, not both"),
        ("max_gpus: 100\npools:\n  context: {max_replicas: 2}\n  generation: {min_replicas: 10, max_replicas: 12}\npd_ratio: {min: 0.5}\n",
         "policy.yaml: pd_ratio: no context:generation replica counts within pools.context (1..2) and pools.generation (10..12)"),
        ("max_gpus: 3\npools:\n  context: {min_replicas: 2}\n  generation: {min_replicas: 2}\n",
         "policy.yaml: max_gpus: 3 is below 4, the GPUs of the smallest deployment"),
    ],
)
def test_a_bad_field_is_named_with_its_path(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_the_ratio_bound_moves_the_cheapest_deployment(tmp_path: Path) -> None:
    policy = load_autoscale_policy(write(tmp_path, "max_gpus: 3\npd_ratio: {min: 2}\n"))
    assert policy.allows(2, 1) and not policy.allows(1, 1) and not policy.allows(4, 2)  # 6 GPUs > 3
    assert "max_gpus: 2.5 is below 3" in error_of(tmp_path, "max_gpus: 2.5\npd_ratio: {min: 2}\n")


def test_generation_range_holds_bounds_ratio_and_cost() -> None:
    policy = AutoscalePolicy(max_gpus=10, pools={"generation": {"max_replicas": 6}}, pd_ratio={"min": 0.5, "max": 2})
    assert list(policy.generation_range(2)) == [1, 2, 3, 4]
    assert list(policy.generation_range(4)) == [2, 3, 4, 5, 6]
    assert list(policy.generation_range(6)) == [3, 4]  # 6 + g <= 10 GPUs
    assert list(policy.generation_range(7)) == []  # the ratio wants g >= 4, the GPUs allow g <= 3
    assert list(policy.generation_range(9)) == [] and list(policy.generation_range(0)) == []


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "max_gpus: 8\nslo:\n  ttft_ms: [500\n")
    assert message.startswith(f"{tmp_path / 'policy.yaml'}: line ") and "invalid YAML" in message


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    assert "duplicate key 'hysteresis'" in error_of(tmp_path, "max_gpus: 8\nhysteresis: 0.1\nhysteresis: 0.2\n")


def test_a_file_that_is_not_a_mapping_or_missing_says_so(tmp_path: Path) -> None:
    assert "expected a mapping of settings, got list" in error_of(tmp_path, "- a\n")
    assert "policy.yaml: max_gpus: set exactly one budget" in error_of(tmp_path, "")
    with pytest.raises(AutoscalePolicyError, match="no-such.yaml: cannot read"):
        load_autoscale_policy(tmp_path / "no-such.yaml")


def test_the_policy_and_planner_do_not_import_torch() -> None:
    import subprocess

    code = "import tandem.orchestrator.autoscale_policy, tandem.orchestrator.planner, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
