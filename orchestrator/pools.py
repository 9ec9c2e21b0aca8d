"""Worker pools on Ray: one actor per worker (workers/ray_actor.py), placed by Ray's resources,
restarted by Ray when its process dies, watched here.

Life cycle: ``start`` creates every actor and waits until each serves (``on_up`` per worker);
then one task per worker pings it every ``health_interval_s``. A failed or late ping calls
``on_down(worker_id)`` at once; the task then polls ``ready()`` until Ray's restart answers (a
fresh process: same worker id, new epoch, maybe a new port) and calls ``on_up`` with the new
info. A restart that fails in the worker's start kills the actor for good (Ray does not retry a
constructor that raised, whatever ``max_restarts`` says), so the task creates a new actor, backing
off. ``add_worker`` and ``remove_worker`` resize a pool while it serves (the planner's hands):
a removed worker leaves routing first, then drains (Drain RPC: its requests finish, its leases
are acknowledged or expire), then stops. ``stop`` stops the server in every actor, then kills them.

Callbacks run on the event loop that called ``start``. Importing this module starts no Ray and
no torch; ``start`` needs ``ray.init`` to have run (or connects to a cluster as Ray does).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

from tandem.orchestrator.cluster import WorkerInfo
from tandem.orchestrator.worker_client import WorkerCallError, WorkerClient
from tandem.workers.cluster_auth import TOKEN_ENV, ClusterAuth

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
KILL_CONFIRM_TIMEOUT_S = 15.0  # how long stop() waits for killed actors to be gone
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
        auth: ClusterAuth = ClusterAuth(),
    ) -> None:
        self._members = [_Member(f"{spec.role}-{i}", spec) for spec in specs for i in range(spec.count)]
        self._on_up = on_up
        self._auth = auth  # drains call workers; and a token the orchestrator holds, its workers get
        self._on_down = on_down
        self._health_interval_s = health_interval_s
        self._ready_timeout_s = ready_timeout_s
        self._ping_timeout_s = ping_timeout_s
        self._actors: dict[str, Any] = {}  # worker id -> ActorHandle
        self._infos: dict[str, WorkerInfo] = {}  # worker id -> info of the serving epoch (absent while down)
        self._monitors: dict[str, asyncio.Task] = {}  # worker id -> its health watch

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
        for member in self._members:
            self._watch_member(member)
        return list(readies)

    def count(self, role: str) -> int:
        """Workers of ``role`` this pool runs (serving or being restarted)."""
        return len(self.worker_ids(role))

    def worker_ids(self, role: str) -> list[str]:
        """Ids of the workers of ``role`` this pool runs (serving or being restarted)."""
        return [m.worker_id for m in self._members if m.spec.role == role]

    async def add_worker(self, role: str) -> WorkerInfo:
        """Scale up by one: start a worker with ``role``'s pool spec; routed to once it serves."""
        spec = next((m.spec for m in self._members if m.spec.role == role), None)
        if spec is None:
            raise ValueError(f"no {role} pool to grow")
        taken = {m.worker_id for m in self._members}
        member = _Member(next(f"{role}-{i}" for i in itertools.count() if f"{role}-{i}" not in taken), spec)
        self._members.append(member)
        self._actors[member.worker_id] = self._create(member)
        try:
            info = await self._first_ready(member)
        except BaseException:
            ray.kill(self._actors.pop(member.worker_id), no_restart=True)
            self._members.remove(member)
            raise
        self._infos[info.worker_id] = info
        self._notify(self._on_up, info)
        self._watch_member(member)
        logger.info("worker %s added (%d %s workers)", info.worker_id, self.count(role), role)
        return info

    async def remove_worker(self, worker_id: str, drain_timeout_s: float = 120.0) -> int:
        """Scale down by one, losing no request: out of routing at once (``on_down``), then drained
        (its requests finish and every lease on its blocks is acknowledged or expires, within
        ``drain_timeout_s``), then stopped. Returns how many requests it finished while draining."""
        member = next((m for m in self._members if m.worker_id == worker_id), None)
        if member is None:
            raise ValueError(f"no worker {worker_id} in the pools")
        self._monitors.pop(worker_id).cancel()  # a worker being stopped is not one to restart
        info = self._infos.pop(worker_id, None)
        self._notify(self._on_down, worker_id)
        finished = 0
        if info is not None:
            client = WorkerClient(info.address, timeout_s=drain_timeout_s, auth=self._auth)
            try:
                finished = await client.drain()
            except WorkerCallError as error:  # stop it anyway: its leases expire on their own
                logger.warning("worker %s did not drain: %s", worker_id, error)
            finally:
                await client.close()
        actor = self._actors.pop(worker_id)
        try:
            await asyncio.wait_for(actor.stop.remote(), STOP_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError) as error:
            logger.warning("worker %s did not stop cleanly: %r", worker_id, error)
        ray.kill(actor, no_restart=True)
        self._members.remove(member)
        logger.info("worker %s removed after finishing %d requests (%d %s workers)",
                    worker_id, finished, self.count(member.spec.role), member.spec.role)
        return finished

    def workers(self) -> list[WorkerInfo]:
        """The workers serving now (a worker being restarted is absent)."""
        return list(self._infos.values())

    def actor(self, worker_id: str) -> Any:
        """The Ray actor handle of a worker (for tools and tests)."""
        return self._actors[worker_id]

    async def stop(self) -> None:
        for task in self._monitors.values():
            task.cancel()
        await asyncio.gather(*self._monitors.values(), return_exceptions=True)
        self._monitors.clear()
        stops = [asyncio.wait_for(actor.stop.remote(), STOP_TIMEOUT_S) for actor in self._actors.values()]
        for worker_id, result in zip(self._actors, await asyncio.gather(*stops, return_exceptions=True)):
            if isinstance(result, BaseException):
                logger.warning("worker %s did not stop cleanly: %r", worker_id, result)
        actors = list(self._actors.values())
        self._kill_all()
        await asyncio.gather(*(_until_dead(actor) for actor in actors))
        self._infos.clear()

    # -- internals ----------------------------------------------------------------------------

    def _create(self, member: _Member) -> Any:
        from tandem.workers.ray_actor import WorkerActor  # argparse and grpc: no torch

        options = dict(
            max_restarts=-1, max_task_retries=0, num_cpus=member.spec.num_cpus,
            num_gpus=member.spec.num_gpus, resources=dict(member.spec.resources),
        )
        if self._auth.token:  # by Ray's runtime env: whoever can read that can run code on the cluster anyway
            options["runtime_env"] = {"env_vars": {TOKEN_ENV: self._auth.token}}
        return ray.remote(WorkerActor).options(**options).remote(member.argv())

    async def _first_ready(self, member: _Member) -> WorkerInfo:
        try:
            ready = await asyncio.wait_for(self._actors[member.worker_id].ready.remote(), self._ready_timeout_s)
        except asyncio.TimeoutError as error:
            raise PoolStartError(member.worker_id, f"not ready after {self._ready_timeout_s:.0f} s") from error
        except RayActorError as error:  # the last line of its traceback names the error
            raise PoolStartError(member.worker_id, str(error).strip().splitlines()[-1]) from error
        return WorkerInfo.from_ready(ready)

    def _watch_member(self, member: _Member) -> None:
        self._monitors[member.worker_id] = asyncio.create_task(self._watch(member), name=f"watch-{member.worker_id}")

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


async def _until_dead(actor: Any, timeout_s: float = KILL_CONFIRM_TIMEOUT_S) -> None:
    """Wait until a killed actor stops answering: ray.kill only asks, and on a loaded machine a
    call sent right after it can still be served, so "stopped" would not yet be true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            await asyncio.wait_for(actor.ping.remote(), 1.0)
        except RayActorError:
            return
        except asyncio.TimeoutError:
            continue
        await asyncio.sleep(0.1)
    logger.warning("an actor killed %.0f s ago still answers", timeout_s)
