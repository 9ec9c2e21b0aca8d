"""The planner's loop inside `tandem serve`: observe an interval, decide, resize the pools.

Every ``policy.interval_s`` it builds an Observation from what the app recorded (arrivals,
lengths, TTFT and inter-token gaps: orchestrator/interval_stats.py) and what the workers last
reported (queued prefill tokens, running sequences, KV usage), asks the Planner, logs the reason,
and applies the decision through the pools: a new worker joins routing once it serves; a removed
one (the least busy of its pool) leaves routing, drains and stops, so no request is lost. Ray's
autoscaler adds or removes nodes for the actors. One decision is applied before the next is taken.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from tandem.orchestrator.cluster import Cluster
from tandem.orchestrator.interval_stats import IntervalStats
from tandem.orchestrator.planner import Action, Decision, Planner
from tandem.orchestrator.planner_load import Observation
from tandem.orchestrator.router import WorkerLoad

if TYPE_CHECKING:  # pools imports Ray; the CLI imports this module
    from tandem.orchestrator.pools import WorkerPools

logger = logging.getLogger(__name__)

ROLES = ("context", "generation")


class Autoscaler:
    def __init__(self, planner: Planner, pools: WorkerPools, cluster: Cluster, stats: IntervalStats) -> None:
        self.planner = planner
        self.pools = pools
        self.cluster = cluster
        self.stats = stats
        self.decisions: list[Decision] = []  # every decision taken, in order (for tests and tools)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.stats.take()  # the first interval starts now
        self._task = asyncio.get_running_loop().create_task(self._run(), name="autoscaler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def step(self) -> Decision:
        """One interval's decision, applied."""
        decision = self.planner.decide(self.observe(), time.monotonic())
        (logger.debug if decision.action is Action.HOLD else logger.info)("planner: %s", decision.reason)
        self.decisions.append(decision)
        for role, target in zip(ROLES, (decision.context_replicas, decision.generation_replicas)):
            while self.pools.count(role) < target:
                await self.pools.add_worker(role)
            while self.pools.count(role) > target:
                await self.pools.remove_worker(self._least_busy(role))
        return decision

    def observe(self) -> Observation:
        interval = self.stats.take()
        loads = self.cluster.loads()
        context = [load for load in loads if load.role == "context"]
        generation = [load for load in loads if load.role == "generation"]
        return Observation(
            context_replicas=self.pools.count("context"),
            generation_replicas=self.pools.count("generation"),
            arrival_rate=interval.arrivals / interval.seconds,
            mean_prompt_tokens=(interval.uncached_prompt_tokens / interval.finished if interval.finished
                                else interval.prompt_tokens / max(interval.arrivals, 1)),
            mean_output_tokens=interval.output_tokens / interval.finished if interval.finished else 0.0,
            queued_prefill_tokens=sum(load.queued_prefill_tokens for load in context),
            running_seqs=sum(load.num_running for load in generation),
            context_kv_usage=_kv_usage(context),
            generation_kv_usage=_kv_usage(generation),
            ttft_ms=interval.percentiles_ms(interval.ttft_s),
            itl_ms=interval.percentiles_ms(interval.itl_s),
        )

    def _least_busy(self, role: str) -> str:
        """The worker of ``role`` to remove: one being restarted (it serves nobody), else the one
        running the fewest sequences."""
        members = self.pools.worker_ids(role)
        loads = {load.worker_id: load for load in self.cluster.loads()}
        return min(members, key=lambda w: (w in loads, loads[w].num_running + loads[w].num_waiting if w in loads else 0, w))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.planner.policy.interval_s)
            try:
                await self.step()
            except Exception:  # a failed resize must not end autoscaling; the next interval retries
                logger.exception("autoscaler step failed")


def _kv_usage(loads: list[WorkerLoad]) -> float:
    total = sum(load.num_total_blocks for load in loads)
    return 1.0 - sum(load.num_free_blocks for load in loads) / total if total else 0.0
