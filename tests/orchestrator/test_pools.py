"""Worker pools on a real local Ray: tiny workers come up with their roles and epochs and answer
Stats over gRPC; a worker whose process is killed is reported down, restarted by Ray and reported
up again with the same id and a new epoch (by a new actor where Ray gives up); a worker that cannot start fails `start` with its
error; `stop` leaves no actor alive. The pool runs on an event loop of its own thread, as in the
orchestrator, so that its health checks go on between tests."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from tandem.orchestrator.pools import PoolSpec, PoolStartError, WorkerInfo, WorkerPools
from tandem.orchestrator.worker_client import WorkerClient

EVENT_TIMEOUT_S = 120  # a restart loads torch and the model again on a busy 2-core machine
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def on(loop: asyncio.AbstractEventLoop, coro: Coroutine, timeout: float = EVENT_TIMEOUT_S) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def tiny_args(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--block-size", "4",
            "--kv-cache-bytes", str(NUM_BLOCKS * 2048)]  # 2 layers, K and V, 4 tokens, 2 heads of 16, float32


async def stats(address: str):
    client = WorkerClient(address, timeout_s=10)
    try:
        return await client.stats()
    finally:
        await client.close()


class Events:
    """on_up / on_down as a queue the test thread waits on."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()

    def up(self, info: WorkerInfo) -> None:
        self.queue.put(("up", info))

    def down(self, worker_id: str) -> None:
        self.queue.put(("down", worker_id))

    def next(self, timeout: float = EVENT_TIMEOUT_S) -> tuple[str, Any]:
        return self.queue.get(timeout=timeout)


@pytest.fixture(scope="module")
def pool(local_ray, loop, tiny_llama) -> Iterator[tuple[WorkerPools, Events]]:
    events = Events()
    specs = [PoolSpec("context", 1, tiny_args(tiny_llama[0])), PoolSpec("generation", 1, tiny_args(tiny_llama[0]))]
    pools = WorkerPools(specs, on_up=events.up, on_down=events.down, health_interval_s=0.5, ready_timeout_s=EVENT_TIMEOUT_S)
    on(loop, pools.start())
    yield pools, events
    on(loop, pools.stop())


def test_start_brings_up_each_role_serving_stats(pool, loop) -> None:
    pools, events = pool
    ups = [events.next(timeout=0) for _ in range(2)]
    assert {kind for kind, _ in ups} == {"up"}
    infos = {info.worker_id: info for _, info in ups}
    assert set(infos) == {"context-0", "generation-0"} and sorted(pools.workers(), key=lambda w: w.worker_id) == sorted(
        infos.values(), key=lambda w: w.worker_id)
    for worker_id, info in infos.items():
        assert info.role == worker_id.split("-")[0] and info.epoch > 0 and info.num_blocks == NUM_BLOCKS
        assert info.kv_events_topic and info.kv_events_endpoint.startswith("tcp://")
        reply = on(loop, stats(info.address))
        assert (reply.worker_id, reply.epoch, reply.num_total_blocks) == (worker_id, info.epoch, NUM_BLOCKS)


def test_killed_worker_comes_back_with_same_id_and_new_epoch(pool, loop) -> None:
    pools, events = pool
    before = {info.worker_id: info for info in pools.workers()}["generation-0"]
    ray.kill(pools.actor("generation-0"), no_restart=False)  # Ray restarts the process
    assert events.next(timeout=30) == ("down", "generation-0")
    kind, after = events.next()
    assert kind == "up" and after.worker_id == "generation-0" and after.role == "generation"
    assert after.epoch > before.epoch
    assert on(loop, stats(after.address)).epoch == after.epoch
    assert after in pools.workers() and before not in pools.workers()
    assert events.queue.empty()  # the context worker was never reported


def test_worker_killed_for_good_is_replaced_by_a_new_actor(pool, loop) -> None:
    pools, events = pool
    before, old_actor = {info.worker_id: info for info in pools.workers()}["context-0"], pools.actor("context-0")
    ray.kill(old_actor, no_restart=True)  # Ray will not restart it: the pool must
    assert events.next(timeout=30) == ("down", "context-0")
    kind, after = events.next()
    assert kind == "up" and after.worker_id == "context-0" and after.epoch > before.epoch
    assert pools.actor("context-0") != old_actor
    assert on(loop, stats(after.address)).epoch == after.epoch


def test_worker_that_cannot_start_fails_start_with_its_error(local_ray, loop, tmp_path) -> None:
    events = Events()
    spec = PoolSpec("context", 1, tiny_args(tmp_path / "no-such-model"))
    pools = WorkerPools([spec], on_up=events.up, on_down=events.down, ready_timeout_s=EVENT_TIMEOUT_S)
    with pytest.raises(PoolStartError, match="context-0.*no-such-model"):
        on(loop, pools.start())
    assert events.queue.empty()


def test_stop_leaves_no_actor_alive(pool, loop) -> None:
    pools, events = pool
    actors = [pools.actor(info.worker_id) for info in pools.workers()]
    on(loop, pools.stop())
    assert pools.workers() == [] and events.queue.empty()  # stopping is not a failure
    for actor in actors:
        with pytest.raises(RayActorError):
            ray.get(actor.ping.remote(), timeout=30)
