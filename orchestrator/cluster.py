"""The orchestrator's live view of its workers: who is up, at which epoch, how loaded, and which
KV blocks each holds.

Workers come and go through `add` and `remove` (the pools call them as actors start, die and
restart). For each worker the cluster keeps a gRPC client, the load its last Stats reported
(refreshed every `stats_interval_s` on the event loop), the prefill tokens this orchestrator has
in flight on it (fresher than any Stats), and follows its KV-event stream into the block index
that kv-aware routing reads. A worker removed here is out of routing at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from dataclasses import dataclass, fields, replace

from tandem.orchestrator.block_index import BlockIndex, KVEventFollower
from tandem.orchestrator.router import WorkerLoad
from tandem.orchestrator.transfer_paths import TransferPaths
from tandem.orchestrator.worker_client import WorkerCallError, WorkerClient
from tandem.proto import tandem_pb2 as pb
from tandem.workers.cluster_auth import ClusterAuth

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker's ready line says about it (pools/actors and test harnesses alike)."""

    worker_id: str
    role: str
    epoch: int
    address: str
    kv_events_endpoint: str
    kv_events_replay_endpoint: str
    kv_events_topic: str
    num_blocks: int

    @classmethod
    def from_ready(cls, ready: dict[str, Any]) -> WorkerInfo:
        return cls(**{f.name: ready[f.name] for f in fields(cls)})


@dataclass(slots=True)
class _Member:
    info: WorkerInfo
    client: WorkerClient
    load: WorkerLoad
    prefill_tokens_in_flight: int = 0
    stats: pb.StatsResponse | None = None  # the last answer, for the per-worker metrics


class Cluster:
    def __init__(self, block_size: int, *, stats_interval_s: float = 0.5, auth: ClusterAuth = ClusterAuth()) -> None:
        self.block_size = block_size
        self.auth = auth
        self.index = BlockIndex(block_size)
        self.follower = KVEventFollower(self.index)
        self.stats_interval_s = stats_interval_s
        self._members: dict[str, _Member] = {}
        self._retired: list[WorkerClient] = []  # clients of workers that left; closed with the cluster
        self._stats_task: asyncio.Task | None = None
        self.transfer_paths = TransferPaths()

    def add(self, info: WorkerInfo) -> None:
        """A worker is up (new, or restarted with a new epoch): route to it from now on."""
        old = self._members.pop(info.worker_id, None)
        if old is not None:
            self._retired.append(old.client)
        self.transfer_paths.forget(info.worker_id)
        load = WorkerLoad(info.worker_id, info.role, 0, 0, 0, 0, 0, healthy=True)
        self._members[info.worker_id] = _Member(info, WorkerClient(info.address, auth=self.auth), load)
        self.follower.follow(
            info.worker_id, info.epoch, info.kv_events_endpoint, info.kv_events_replay_endpoint, info.kv_events_topic
        )
        logger.info("worker %s (%s, epoch %d) at %s joined", info.worker_id, info.role, info.epoch, info.address)

    def remove(self, worker_id: str) -> None:
        """A worker died or left: out of routing and out of the block index now."""
        member = self._members.pop(worker_id, None)
        if member is None:
            return
        self.follower.unfollow(worker_id)
        self.transfer_paths.forget(worker_id)
        # Not closed yet: streams in flight on it must fail on their own (UNAVAILABLE, retriable),
        # not be cancelled under their callers by a closing channel.
        self._retired.append(member.client)
        logger.warning("worker %s (%s) left routing", worker_id, member.info.role)

    def mark_unreachable(self, worker_id: str) -> None:
        """A call found the worker gone: out of routing now, not at the next Stats round or pool
        health check (a retry must not be routed back to it). Its next good Stats restores it."""
        member = self._members.get(worker_id)
        if member is not None and member.load.healthy:
            member.load = replace(member.load, healthy=False)
            logger.warning("worker %s is unreachable; routing around it", worker_id)

    def transfer_report(self) -> dict[str, Any]:
        """The KV hand-off paths between the live context and generation workers (see TransferPaths)."""
        return self.transfer_paths.report(*self._handoff_roles())

    def transfer_status(self) -> str:
        """TransferPaths.status of the live context and generation workers."""
        return self.transfer_paths.status(*self._handoff_roles())

    def _handoff_roles(self) -> tuple[list[str], list[str]]:
        by_role: dict[str, list[str]] = {"context": [], "generation": []}
        for worker_id, member in self._members.items():
            by_role.get(member.info.role, []).append(worker_id)
        return by_role["context"], by_role["generation"]

    def client(self, worker_id: str) -> WorkerClient:
        return self._members[worker_id].client

    def loads(self) -> list[WorkerLoad]:
        return [
            replace(m.load, queued_prefill_tokens=m.load.queued_prefill_tokens + m.prefill_tokens_in_flight)
            for m in self._members.values()
        ]

    def last_stats(self) -> list[pb.StatsResponse]:
        return [m.stats for m in self._members.values() if m.stats is not None]

    def cached_blocks(self, token_ids: list[int]) -> dict[str, int]:
        return self.index.cached_prefix_blocks(token_ids)

    @contextlib.contextmanager
    def prefill_in_flight(self, worker_id: str, num_tokens: int) -> Iterator[None]:
        """Count a prefill against its worker's queue while it runs (routing sees it at once)."""
        member = self._members.get(worker_id)
        if member is not None:
            member.prefill_tokens_in_flight += num_tokens
        try:
            yield
        finally:
            if member is not None:
                member.prefill_tokens_in_flight -= num_tokens

    def start(self) -> None:
        self._stats_task = asyncio.get_running_loop().create_task(self._refresh_loads())

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        for client in [*(m.client for m in self._members.values()), *self._retired]:
            await client.close()
        self._members.clear()
        self._retired.clear()
        self.follower.close()

    async def refresh_loads(self) -> None:
        """One Stats round over every worker; an unreachable worker is marked unhealthy."""
        members = list(self._members.values())
        results = await asyncio.gather(*(m.client.stats() for m in members), return_exceptions=True)
        for member, stats in zip(members, results):
            if isinstance(stats, WorkerCallError):
                member.load = replace(member.load, healthy=False)
                continue
            if isinstance(stats, BaseException):
                raise stats
            member.stats = stats
            member.load = WorkerLoad(
                worker_id=member.info.worker_id,
                role=member.info.role,
                num_free_blocks=stats.num_free_blocks,
                num_total_blocks=stats.num_total_blocks,
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                queued_prefill_tokens=0,
                healthy=not stats.draining and stats.epoch == member.info.epoch,
            )

    async def _refresh_loads(self) -> None:
        while True:
            try:
                await self.refresh_loads()
            except Exception:
                logger.exception("refreshing worker loads failed")
            await asyncio.sleep(self.stats_interval_s)
