"""Worker pools on Ray: one actor per worker (workers/ray_actor.py), placed by Ray's resources,
restarted by Ray when its process dies, watched here.

Life cycle: ``start`` creates every actor and waits until each serves (``on_up`` per worker);
then one task per worker pings it every ``health_interval_s``. A failed or late ping calls
``on_down(worker_id)`` at once; the task then polls ``ready()`` until Ray's restart answers (a
fresh process: same worker id, new epoch, maybe a new port) and calls ``on_up`` with the new
info. A restart that fails in the worker's start kills the actor for good (Ray does not retry a
constructor that raised, whatever ``max_restarts`` says), so the task creates a new actor, backing
off. ``stop`` stops the server in every actor, then kills them.

Callbacks run on the event loop that called ``start``. Importing this module starts no Ray and
no torch; ``start`` needs ``ray.init`` to have run (or connects to a cluster as Ray does).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

from tandem.orchestrator.cluster import WorkerInfo

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 60.0  # between attempts to replace an actor that died for good


class PoolStartError(RuntimeError):
    """A worker did not come up; the message carries its error."""

    def __init__(self, worker_id: str, message: str) -> None:
        super().__init__(f"worker {worker_id} failed to start: {message}")
        self.worker_id = worker_id


@dataclass(frozen=True, slots=True)
class PoolSpec:
    role: str
    count: int
    worker_args: list[str]  # `tandem worker` arguments; the pool sets --role and --worker-id
    num_cpus: float = 1
    num_gpus: float = 0  # the worker sees Ray's CUDA_VISIBLE_DEVICES
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Member:
    worker_id: str
    spec: PoolSpec

    def argv(self) -> list[str]:
        # Defaults first, the caller's arguments next, the pool's own last (argparse: last wins).
        return ["--host", "auto", "--port", "0", *self.spec.worker_args,
                "--role", self.spec.role, "--worker-id", self.worker_id]


class WorkerPools:
    def __init__(
        self,
        specs: list[PoolSpec],
        *,
        on_up: Callable[[WorkerInfo], None],
        on_down: Callable[[str], None],
        health_interval_s: float = 1.0,
        ready_timeout_s: float = 600,
        ping_timeout_s: float = 10.0,
    ) -> None:
        self._members = [_Member(f"{spec.role}-{i}", spec) for spec in specs for i in range(spec.count)]
        self._on_up = on_up
        self._on_down = on_down
        self._health_interval_s = health_interval_s
        self._ready_timeout_s = ready_timeout_s
        self._ping_timeout_s = ping_timeout_s
        self._actors: dict[str, Any] = {}  # worker id -> ActorHandle
        self._infos: dict[str, WorkerInfo] = {}  # worker id -> info of the serving epoch (absent while down)
        self._monitors: list[asyncio.Task] = []

    async def start(self) -> list[WorkerInfo]:
        """Create every actor and wait until all serve; on any failure kill them all and raise."""
        try:
            for member in self._members:
                self._actors[member.worker_id] = self._create(member)
            readies = await asyncio.gather(*(self._first_ready(m) for m in self._members), return_exceptions=True)
            failed = [r for r in readies if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        except BaseException:
            self._kill_all()
            raise
        for info in readies:
            self._infos[info.worker_id] = info
            self._notify(self._on_up, info)
        self._monitors = [asyncio.create_task(self._watch(m), name=f"watch-{m.worker_id}") for m in self._members]
        return list(readies)

    def workers(self) -> list[WorkerInfo]:
        """The workers serving now (a worker being restarted is absent)."""
        return list(self._infos.values())

    def actor(self, worker_id: str) -> Any:
        """The Ray actor handle of a worker (for tools and tests)."""
        return self._actors[worker_id]

    async def stop(self) -> None:
        for task in self._monitors:
            task.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)
        self._monitors = []
        stops = [asyncio.wait_for(actor.stop.remote(), STOP_TIMEOUT_S) for actor in self._actors.values()]
        for worker_id, result in zip(self._actors, await asyncio.gather(*stops, return_exceptions=True)):
            if isinstance(result, BaseException):
                logger.warning("worker %s did not stop cleanly: %r", worker_id, result)
        self._kill_all()
        self._infos.clear()

    # -- internals ----------------------------------------------------------------------------

    def _create(self, member: _Member) -> Any:
        from tandem.workers.ray_actor import WorkerActor  # argparse and grpc: no torch

        options = dict(
            max_restarts=-1, max_task_retries=0, num_cpus=member.spec.num_cpus,
            num_gpus=member.spec.num_gpus, resources=dict(member.spec.resources),
        )
        return ray.remote(WorkerActor).options(**options).remote(member.argv())

    async def _first_ready(self, member: _Member) -> WorkerInfo:
        try:
            ready = await asyncio.wait_for(self._actors[member.worker_id].ready.remote(), self._ready_timeout_s)
        except asyncio.TimeoutError as error:
            raise PoolStartError(member.worker_id, f"not ready after {self._ready_timeout_s:.0f} s") from error
        except RayActorError as error:  # the last line of its traceback names the error
            raise PoolStartError(member.worker_id, str(error).strip().splitlines()[-1]) from error
        return WorkerInfo.from_ready(ready)

    def _kill_all(self) -> None:
        for actor in self._actors.values():
            ray.kill(actor, no_restart=True)
        self._actors.clear()

    @staticmethod
    def _notify(callback: Callable[[Any], None], arg: Any) -> None:
        try:
            callback(arg)
        except Exception:  # the caller's bug must not end the health checks
            logger.exception("pool callback %r failed", callback)

    async def _watch(self, member: _Member) -> None:
        """Ping until a ping fails; report down; wait for the worker to serve again; repeat."""
        while True:
            await asyncio.sleep(self._health_interval_s)
            if await self._alive(member.worker_id):
                continue
            self._infos.pop(member.worker_id, None)
            logger.warning("worker %s is down", member.worker_id)
            self._notify(self._on_down, member.worker_id)
            info = await self._recover(member)
            logger.info("worker %s is back, epoch %d at %s", info.worker_id, info.epoch, info.address)
            self._infos[info.worker_id] = info
            self._notify(self._on_up, info)

    async def _alive(self, worker_id: str) -> bool:
        try:
            return await asyncio.wait_for(self._actors[worker_id].ping.remote(), self._ping_timeout_s) is True
        except (RayActorError, asyncio.TimeoutError):
            return False

    async def _recover(self, member: _Member) -> WorkerInfo:
        """The worker's info once it serves again: Ray's restart, or a new actor where Ray gave up."""
        backoff_s = self._health_interval_s
        while True:
            try:
                ready = await asyncio.wait_for(self._actors[member.worker_id].ready.remote(), self._ready_timeout_s)
                return WorkerInfo.from_ready(ready)
            except ActorDiedError as error:  # dead for good: replace it
                logger.error("worker %s died for good, replacing it in %.0f s: %s", member.worker_id, backoff_s, error)
                ray.kill(self._actors[member.worker_id], no_restart=True)  # lest a late restart linger
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                self._actors[member.worker_id] = self._create(member)
            except (RayActorError, asyncio.TimeoutError):  # restarting
                await asyncio.sleep(self._health_interval_s)
