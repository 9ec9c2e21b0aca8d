"""A Prefill, Generate or Release whose caller goes away (the gRPC call is cancelled) at each moment
of the KV hand-off gives every block back: on the context worker while its request is queued, being
prefilled or just handed off, or while a Release waits its turn; on the generation worker while it
reserves blocks, READs, has the owner confirm the lease, commits, is aborted mid-READ, or decodes.

One in-process Worker over a real engine and a fake transfer engine and peers; the engine thread
is held at each moment with threading events, so every interleaving is forced, never timed.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from tandem.kvtransfer.leases import KVHandle
from tandem.kvtransfer.transfer_types import PeerMetadata, TransferStats
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.worker import Worker
from tandem.workers.worker_types import Role, WorkerConfig

PROMPT = list(range(100, 140))  # 40 tokens: 3 blocks of 16
FIRST_TOKEN = 7
PARAMS = SamplingParams(max_tokens=200, ignore_eos=True)
WAIT_S = 10.0  # bound of every wait: a missed event fails the test instead of hanging it


class FakeTransfer:
    """The transfer engine as the worker sees it; a READ lasts until the test lets it end."""

    reads_in_place = True

    def __init__(self) -> None:
        self.read_started = threading.Event()
        self.read_may_end = threading.Event()

    def metadata(self) -> PeerMetadata:
        return PeerMetadata("fake", 1, "fake-agent", b"", 0, 0, 0, "DRAM", 0)

    def has_peer(self, worker_id: str, epoch: int) -> bool:
        return True

    def stage(self, block_ids) -> None:
        return None

    def read_blocks(self, worker_id, epoch, remote, local, *, deadline, tag, remote_staged_at) -> TransferStats:
        self.read_started.set()
        assert self.read_may_end.wait(WAIT_S)
        return TransferStats(len(local), len(local), 0, 0.0)

    def poll_notifications(self) -> list:
        return []

    def reap_abandoned(self) -> list:
        return []


class FakePeers:
    """The owner of a handle: Release answers once the test lets it."""

    def __init__(self) -> None:
        self.release_asked = asyncio.Event()
        self.may_answer = asyncio.Event()
        self.may_answer.set()

    async def release(self, handle: KVHandle, timeout: float) -> bool:
        self.release_asked.set()
        await self.may_answer.wait()
        return True

    async def close(self) -> None:
        pass


def hold_engine_thread(worker: Worker) -> threading.Event:
    """Keep the engine thread busy from now on (commands queue up behind it) until the event is set."""
    go = threading.Event()
    worker.loop.submit(lambda: go.wait(WAIT_S))
    return go


def handle_for(prompt: list[int]) -> KVHandle:
    num_blocks = -(-len(prompt) // 16)
    return KVHandle("ctx/1/1", "ctx", 1, "ctx-agent", "ctx:0", tuple(range(num_blocks)), len(prompt), time.time() + 30)


async def consume(stream) -> None:
    async for _ in stream:
        pass


async def cancel(task: asyncio.Task) -> None:
    """What gRPC does to a handler whose client went away."""
    task.cancel()
    await asyncio.wait({task}, timeout=WAIT_S)
    assert task.done()


async def wait_until_every_block_is_free(worker: Worker) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        stats = await worker.stats()
        if (stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == stats["num_waiting"] == 0
                and stats["num_leases"] == stats["num_transferring"] == 0):
            return
        assert time.monotonic() < deadline, ", ".join(f"{key}={value}" for key, value in stats.items() if key.startswith("num_"))
        await asyncio.sleep(0.01)


def run_worker(engine, role: Role, scenario: Callable[[Worker, FakeTransfer, FakePeers, list[threading.Event]], Awaitable[None]]) -> None:
    """Run scenario against a started worker; then every block must come back. The events in the
    list are set on the way out whatever happened, so that no thread stays held."""

    async def main() -> None:
        transfer, peers, held = FakeTransfer(), FakePeers(), [threading.Event()]
        worker = Worker(engine, WorkerConfig(role, "w", 1, "w:0", "m"), transfer, peers=peers)  # type: ignore[arg-type]
        worker.start()
        try:
            await scenario(worker, transfer, peers, held)
            for event in held:
                event.set()
            transfer.read_may_end.set()
            peers.may_answer.set()
            await wait_until_every_block_is_free(worker)
        finally:
            for event in [*held, transfer.read_may_end]:
                event.set()
            await worker.stop()

    asyncio.run(main())


@pytest.fixture
def engine(make_llm):
    return make_llm(num_blocks=32).engine


# -- the generation worker -------------------------------------------------------------------


async def cancelled_while_reserving(worker: Worker, transfer, peers, held) -> None:
    """The engine thread has made the reservation when the call is cancelled, before the result
    reaches the event loop: the reservation is the cancelled call's all the same."""
    reserve, reserved = worker.engine.reserve_prefilled, threading.Event()

    def reserve_then_wait(*args):
        reservation = reserve(*args)
        reserved.set()
        assert held[0].wait(WAIT_S)
        return reservation

    worker.engine.reserve_prefilled = reserve_then_wait
    task = asyncio.create_task(consume(worker.generate("r", PROMPT, PARAMS, handle_for(PROMPT), FIRST_TOKEN)))
    assert await asyncio.to_thread(reserved.wait, WAIT_S)
    await cancel(task)


async def cancelled_while_reading(worker: Worker, transfer, peers, held) -> None:
    task = asyncio.create_task(consume(worker.generate("r", PROMPT, PARAMS, handle_for(PROMPT), FIRST_TOKEN)))
    assert await asyncio.to_thread(transfer.read_started.wait, WAIT_S)
    await cancel(task)


async def cancelled_while_the_owner_confirms(worker: Worker, transfer, peers, held) -> None:
    peers.may_answer.clear()
    transfer.read_may_end.set()
    task = asyncio.create_task(consume(worker.generate("r", PROMPT, PARAMS, handle_for(PROMPT), FIRST_TOKEN)))
    await asyncio.wait_for(peers.release_asked.wait(), WAIT_S)
    await cancel(task)


async def cancelled_while_the_commit_waits_for_the_engine_thread(worker: Worker, transfer, peers, held) -> None:
    task = asyncio.create_task(consume(worker.generate("r", PROMPT, PARAMS, handle_for(PROMPT), FIRST_TOKEN)))
    assert await asyncio.to_thread(transfer.read_started.wait, WAIT_S)
    held[0] = hold_engine_thread(worker)
    transfer.read_may_end.set()
    await asyncio.wait_for(peers.release_asked.wait(), WAIT_S)  # the commit is queued when Release answers
    await asyncio.sleep(0)
    await cancel(task)


async def aborted_mid_read_then_cancelled_before_the_reservation_is_dropped(worker: Worker, transfer, peers, held) -> None:
    task = asyncio.create_task(consume(worker.generate("r", PROMPT, PARAMS, handle_for(PROMPT), FIRST_TOKEN)))
    assert await asyncio.to_thread(transfer.read_started.wait, WAIT_S)
    assert await worker.abort("r")
    held[0] = hold_engine_thread(worker)
    transfer.read_may_end.set()
    await asyncio.wait_for(peers.release_asked.wait(), WAIT_S)  # then cancel_prefilled is queued
    await asyncio.sleep(0)
    await cancel(task)


async def cancelled_while_decoding(worker: Worker, transfer, peers, held) -> None:
    transfer.read_may_end.set()
    stream = worker.generate("r", PROMPT, PARAMS, handle_for(PROMPT), FIRST_TOKEN)
    first = asyncio.Event()

    async def read() -> None:
        async for _ in stream:
            first.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(first.wait(), WAIT_S)
    await cancel(task)


@pytest.mark.parametrize("scenario", [
    cancelled_while_reserving,
    cancelled_while_reading,
    cancelled_while_the_owner_confirms,
    cancelled_while_the_commit_waits_for_the_engine_thread,
    aborted_mid_read_then_cancelled_before_the_reservation_is_dropped,
    cancelled_while_decoding,
], ids=lambda scenario: scenario.__name__)
def test_a_cancelled_generate_frees_its_blocks(engine, scenario) -> None:
    run_worker(engine, Role.GENERATION, scenario)


# -- the context worker ----------------------------------------------------------------------


async def cancelled_while_queued(worker: Worker, transfer, peers, held) -> None:
    held[0] = hold_engine_thread(worker)
    task = asyncio.create_task(worker.prefill("r", PROMPT, PARAMS))
    await asyncio.sleep(0)  # the task submits its engine-thread call in its first step
    await cancel(task)


async def cancelled_while_prefilling(worker: Worker, transfer, peers, held) -> None:
    step, stepping = worker.engine.step, threading.Event()

    def step_then_wait():
        if worker.engine.requests:  # the prompt is scheduled: hold the thread before its step
            stepping.set()
            assert held[0].wait(WAIT_S)
        return step()

    worker.engine.step = step_then_wait
    task = asyncio.create_task(worker.prefill("r", PROMPT, PARAMS))
    assert await asyncio.to_thread(stepping.wait, WAIT_S)
    await cancel(task)


async def cancelled_just_after_the_hand_off(worker: Worker, transfer, peers, held) -> None:
    """The lease is granted on the engine thread; the call is cancelled before its answer goes out."""
    grant, granted = worker.loop.on_held_kv, threading.Event()

    def grant_then_wait(output) -> None:
        grant(output)
        granted.set()
        assert held[0].wait(WAIT_S)

    worker.loop.on_held_kv = grant_then_wait
    task = asyncio.create_task(worker.prefill("r", PROMPT, PARAMS))
    assert await asyncio.to_thread(granted.wait, WAIT_S)
    await cancel(task)


async def release_cancelled_while_it_waits_for_the_engine_thread(worker: Worker, transfer, peers, held) -> None:
    """A reader's Release that arrived ends the lease even if the reader goes away meanwhile."""
    result = await worker.prefill("r", PROMPT, PARAMS)
    held[0] = hold_engine_thread(worker)
    task = asyncio.create_task(worker.release(result.handle))
    await asyncio.sleep(0)  # the task submits its engine-thread call in its first step
    await cancel(task)


@pytest.mark.parametrize("scenario", [
    cancelled_while_queued, cancelled_while_prefilling, cancelled_just_after_the_hand_off,
    release_cancelled_while_it_waits_for_the_engine_thread,
], ids=lambda scenario: scenario.__name__)
def test_a_cancelled_prefill_frees_its_blocks(engine, scenario) -> None:
    run_worker(engine, Role.CONTEXT, scenario)
