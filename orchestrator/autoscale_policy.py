"""The schema of the autoscaling policy YAML: pydantic at the edge, every key checked.

Owns parsing and validation only; `planner.py` acts on a validated `AutoscalePolicy`. Unknown keys
are errors, and `load_autoscale_policy` names the file and the field path of every problem, like
`load_serve_config` (whose duplicate-key YAML loader and error formatting it reuses). Cross-field
checks (min <= max, P:D ratio bounds reachable with the replica bounds, the cost cap affordable at
the minimum) name the field they blame.

Example (every key but the budget has a default; the budget is exactly one of
`throughput_target_tokens_per_s` and `max_gpus`):

    pools:
      context: {min_replicas: 1, max_replicas: 8, gpus_per_replica: 1}
      generation: {min_replicas: 1, max_replicas: 16}
    slo: {ttft_ms: 500, ttft_percentile: p90, itl_ms: 40, itl_percentile: p90}
    max_gpus: 16
    interval_s: 60
    scale_up_cooldown_s: 60
    scale_down_cooldown_s: 300
    hysteresis: 0.2
    target_utilization: 0.8
    pd_ratio: {min: 0.25, max: 2}
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tandem.orchestrator.yaml_schema import Section, field_error, load_yaml_model

Percentile = Literal["p50", "p90", "p95", "p99"]
MAX_REPLICAS = 1024
_EPS = 1e-9


class AutoscalePolicyError(Exception):
    """A policy file that cannot be read or does not validate; the message names file and field."""


class PoolBounds(Section):
    min_replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    """Fewest workers the planner keeps in this pool (a disaggregated deployment needs both pools)."""
    max_replicas: int = Field(8, ge=1, le=MAX_REPLICAS)
    """Most workers the planner starts in this pool."""
    gpus_per_replica: float = Field(1.0, gt=0)
    """GPUs one worker of this pool holds; what `max_gpus` counts."""

    @model_validator(mode="after")
    def _min_below_max(self) -> PoolBounds:
        if self.max_replicas < self.min_replicas:
            raise field_error("max_replicas", f"{self.max_replicas} is below min_replicas {self.min_replicas}")
        return self


class AutoscalePools(Section):
    context: PoolBounds = Field(default_factory=PoolBounds)
    """Workers that prefill prompts and hand their KV off."""
    generation: PoolBounds = Field(default_factory=PoolBounds)
    """Workers that decode."""


class SloConfig(Section):
    ttft_ms: float = Field(1000.0, gt=0)
    """Time to first token the deployment promises, at `ttft_percentile`."""
    ttft_percentile: Percentile = "p90"
    """Which percentile of measured TTFT is held to `ttft_ms`."""
    itl_ms: float = Field(50.0, gt=0)
    """Inter-token latency the deployment promises, at `itl_percentile`."""
    itl_percentile: Percentile = "p90"
    """Which percentile of measured inter-token latency is held to `itl_ms`."""


class PdRatio(Section):
    min: float = Field(0.0, ge=0)
    """Fewest context workers per generation worker; 0: no lower bound."""
    max: float | None = Field(None, gt=0)
    """Most context workers per generation worker; None: no upper bound."""

    @model_validator(mode="after")
    def _min_below_max(self) -> PdRatio:
        if self.max is not None and self.max < self.min:
            raise field_error("max", f"{self.max:g} is below min {self.min:g}")
        return self


class AutoscalePolicy(Section):
    pools: AutoscalePools = Field(default_factory=AutoscalePools)
    slo: SloConfig = Field(default_factory=SloConfig)
    throughput_target_tokens_per_s: float | None = Field(None, gt=0)
    """Budget as load: size the pools for at most this many prompt + output tokens/s; more load queues."""
    max_gpus: float | None = Field(None, gt=0)
    """Budget as cost: the two pools together hold at most this many GPUs (gpus_per_replica each)."""
    interval_s: float = Field(60.0, gt=0)
    """Seconds between two planner decisions (one observation each)."""
    scale_up_cooldown_s: float = Field(60.0, ge=0)
    """No change that adds a worker within this many seconds of the last change."""
    scale_down_cooldown_s: float = Field(300.0, ge=0)
    """No change that only removes workers within this many seconds of the last change."""
    hysteresis: float = Field(0.2, ge=0, lt=1)
    """A pool shrinks only when its need fits in (1 - hysteresis) of the smaller pool; also the latency headroom a shrink needs."""
    target_utilization: float = Field(0.8, gt=0, le=1)
    """Fraction of a worker's profiled capacity the planner plans to use."""
    pd_ratio: PdRatio = Field(default_factory=PdRatio)
    """Bounds on context:generation replicas."""

    @model_validator(mode="after")
    def _budget_and_bounds_agree(self) -> AutoscalePolicy:
        if self.throughput_target_tokens_per_s is None and self.max_gpus is None:
            raise field_error("max_gpus", "set exactly one budget: max_gpus (a cost cap) or throughput_target_tokens_per_s")
        if self.throughput_target_tokens_per_s is not None and self.max_gpus is not None:
            raise field_error("throughput_target_tokens_per_s", "set exactly one budget: this or max_gpus, not both")
        ctx, gen, ratio = self.pools.context, self.pools.generation, self.pd_ratio
        if not any(self._ratio_range(c) for c in range(ctx.min_replicas, ctx.max_replicas + 1)):
            upper = "inf" if ratio.max is None else f"{ratio.max:g}"
            raise field_error(
                "pd_ratio",
                f"no context:generation replica counts within pools.context ({ctx.min_replicas}..{ctx.max_replicas})"
                f" and pools.generation ({gen.min_replicas}..{gen.max_replicas}) have a ratio in [{ratio.min:g}, {upper}]",
            )
        if self.max_gpus is not None:
            cheapest = min(
                self.gpus(c, g.start) for c in range(ctx.min_replicas, ctx.max_replicas + 1) if (g := self._ratio_range(c))
            )
            if cheapest > self.max_gpus + _EPS:
                raise field_error(
                    "max_gpus", f"{self.max_gpus:g} is below {cheapest:g}, the GPUs of the smallest deployment min_replicas and pd_ratio allow"
                )
        return self

    def _ratio_range(self, context_replicas: int) -> range:
        """Generation counts within their bounds whose ratio with `context_replicas` is within pd_ratio."""
        gen, ratio, c = self.pools.generation, self.pd_ratio, context_replicas
        lo = gen.min_replicas if ratio.max is None else max(gen.min_replicas, math.ceil(c / ratio.max - _EPS))
        hi = gen.max_replicas if ratio.min == 0 else min(gen.max_replicas, math.floor(c / ratio.min + _EPS))
        return range(lo, hi + 1)

    def gpus(self, context_replicas: int, generation_replicas: int) -> float:
        """GPUs a deployment of this many workers per pool holds."""
        return context_replicas * self.pools.context.gpus_per_replica + generation_replicas * self.pools.generation.gpus_per_replica

    def generation_range(self, context_replicas: int) -> range:
        """Generation counts allowed beside `context_replicas`: bounds, pd_ratio and max_gpus all hold."""
        ctx = self.pools.context
        if not ctx.min_replicas <= context_replicas <= ctx.max_replicas:
            return range(0)
        allowed = self._ratio_range(context_replicas)
        if self.max_gpus is None:
            return allowed
        left = self.max_gpus - context_replicas * ctx.gpus_per_replica
        most = math.floor(left / self.pools.generation.gpus_per_replica + _EPS)
        return range(allowed.start, min(allowed.stop, most + 1))

    def allows(self, context_replicas: int, generation_replicas: int) -> bool:
        """Whether the pair is within the replica bounds, pd_ratio and max_gpus."""
        return generation_replicas in self.generation_range(context_replicas)


def load_autoscale_policy(path: str | Path) -> AutoscalePolicy:
    """Read and validate a policy YAML file."""
    return load_yaml_model(path, AutoscalePolicy, AutoscalePolicyError)
