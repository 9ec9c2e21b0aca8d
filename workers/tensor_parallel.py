"""Tensor parallelism for the engine: rank 0 hosts the LLMEngine, followers run its steps with it.

The model layers already shard (``TensorParallel(rank, size)``; linears all-reduce, the
vocabulary-parallel LM head all-gathers); this module is the runtime around them:

- ``start_engine`` (rank 0, the caller's process) checks that the model splits, starts followers
  1..N-1 with multiprocessing spawn, joins the process group with them (nccl on CUDA, rank r on
  cuda:r; gloo on CPU), loads its own shard and builds the LLMEngine over it.
- The engine alone owns the scheduler, block pool and sampler. Every rank holds its shard of the
  weights and a KV cache for its share of the kv heads, with the same number of blocks (the fewest
  any rank fits), so one block id means the same block everywhere.
- Each step ``TensorParallelRunner.execute`` flattens the plan into a StepBatch, broadcasts it
  (tensor_parallel_wire), and runs the local forward; all ranks meet in the layers' collectives,
  and rank 0 samples from the gathered logits.
- ``TensorParallelGroup.close`` broadcasts SHUTDOWN and joins the followers (terminating any that
  do not exit). A follower that fails or dies makes the group unusable: the next step raises
  TensorParallelError naming it (rank 0 never waits longer than the step timeout), and the
  engine re-raises it to its caller after aborting the step's requests.

torch.distributed keeps one default group per process, so a process hosts one tensor-parallel
engine at a time.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from tandem.models.layers import TensorParallel
from tandem.models.loader import load_model
from tandem.models.registry import model_class_for
from tandem.models.source import load_config, resolve_model
from tandem.workers.config import EngineConfig
from tandem.workers.engine import LLMEngine
from tandem.workers.kv_cache_sizing import kv_cache_spec
from tandem.workers.model_runner import ModelRunner, StepBatch, build_batch
from tandem.workers.scheduler import ScheduledChunk
from tandem.workers.tensor_parallel_follower import FollowerSpec, run_follower
from tandem.workers.tensor_parallel_wire import (
    Failed,
    KVCommand,
    Loaded,
    Ready,
    Started,
    TensorParallelError,
    join_group,
    send_kv_command,
    send_shutdown,
    send_step,
)

logger = logging.getLogger(__name__)

DEFAULT_INIT_TIMEOUT_S = 600.0  # spawn, join, load a shard, allocate its KV cache
DEFAULT_STEP_TIMEOUT_S = 300.0  # one collective inside a step
EXIT_TIMEOUT_S = 10.0  # a follower's exit after SHUTDOWN, before it is terminated

Message = TypeVar("Message", Started, Loaded, Ready)


def start_engine(
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    device_ids: Sequence[int] | None = None,
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
) -> LLMEngine:
    """An LLMEngine over ``config.tensor_parallel_size`` ranks, this process being rank 0.

    ``device_ids``: one CUDA device per rank (default: cuda:0..N-1, or from the index ``device``
    names). Raises ValueError before starting anything when the model does not split evenly."""
    check_splits(config.model, config.tensor_parallel_size)
    group = TensorParallelGroup.start(
        config, device, dtype, device_ids=device_ids, init_timeout_s=init_timeout_s, step_timeout_s=step_timeout_s
    )
    try:
        loaded = load_model(config.model, dtype=dtype, device=group.device, show_progress=config.show_progress, tp=group.tp)
        return LLMEngine(loaded, config, group.device, tp_group=group)
    except BaseException as e:
        group.abort(f"rank 0 failed to start: {e!r}")  # followers may wait in start-up, not for steps
        raise


def check_splits(model: str | None, size: int) -> None:
    """Raise ValueError, naming the dimension, if the model cannot be split over ``size`` ranks:
    the rank-0 model is built on the meta device, so every layer checks its own split."""
    source = resolve_model(model)
    hf = load_config(source)
    model_class = model_class_for(hf)
    try:
        kv_cache_spec(hf, 1, torch.float32, size)
        with torch.device("meta"):
            model_class(hf, TensorParallel(0, size))
    except ValueError as e:
        raise ValueError(f"model {source.name} cannot be split over tensor_parallel_size={size}: {e}") from e
    except TypeError as e:  # a model class that takes no TensorParallel
        raise ValueError(f"{model_class.__name__} does not support tensor parallelism") from e


@dataclass(frozen=True, slots=True)
class _Follower:
    rank: int
    process: BaseProcess
    conn: Connection


class TensorParallelGroup:
    """Rank 0's side of the group: the follower processes, the control group, the shutdown."""

    def __init__(self, tp: TensorParallel, device: torch.device, followers: list[_Follower], init_timeout_s: float) -> None:
        self.tp = tp
        self.device = device
        self._followers = followers
        self._init_timeout_s = init_timeout_s
        self._control: dist.ProcessGroup | None = None
        self._broken: str | None = None  # why no step can run any more
        self._closed = False
        # Held from a message's broadcast to the end of its collectives, so that steps (engine
        # thread) and KV gathers and scatters (transfer threads) reach the followers in one order.
        self.exclusive = threading.RLock()
        self._finalizer = weakref.finalize(self, _abandon, [f.process for f in followers])

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        *,
        device_ids: Sequence[int] | None,
        init_timeout_s: float,
        step_timeout_s: float,
    ) -> TensorParallelGroup:
        """Spawn the followers and join the process group with them; they load their shards
        meanwhile. Raises TensorParallelError, with the followers stopped, if any fails."""
        size = config.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process; close the other "
                               "tensor-parallel engine first")
        devices = _rank_devices(device, size, device_ids)
        if devices[0].type == "cuda":
            torch.cuda.set_device(devices[0])
        init_timeout = timedelta(seconds=init_timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=init_timeout, wait_for_workers=False)
        threads = max(1, torch.get_num_threads() // size) if devices[0].type == "cpu" else None
        context = torch_mp.get_context("spawn")
        followers = []
        for rank in range(1, size):
            spec = FollowerSpec(rank, size, store.port, str(devices[rank]), dtype, config, init_timeout_s, step_timeout_s, threads)
            ours, theirs = context.Pipe()
            process = context.Process(target=run_follower, args=(spec, theirs), name=f"tandem-tp-rank{rank}", daemon=True)
            process.start()
            theirs.close()
            followers.append(_Follower(rank, process, ours))
        group = cls(TensorParallel(0, size), devices[0], followers, init_timeout_s)
        try:
            deadline = time.monotonic() + init_timeout_s
            for follower in followers:
                group._receive(follower, Started, "starting", deadline)
            group._control = join_group(0, size, store, devices[0], step_timeout_s)
        except BaseException as e:
            error = e if isinstance(e, TensorParallelError) else group._failure(e)  # before stopping anyone
            group.abort(str(error))
            if error is e:
                raise
            raise error from e
        logger.info("tensor parallel: %d ranks on %s", size, ", ".join(map(str, devices)))
        return group

    @property
    def size(self) -> int:
        return self.tp.size

    @property
    def pids(self) -> tuple[int, ...]:
        """Process ids of the followers (ranks 1..N-1)."""
        return tuple(f.process.pid for f in self._followers if f.process.pid is not None)

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The fewest KV blocks any rank fits (rank 0 offers ``num_blocks``); every follower
        allocates that many before this returns."""
        deadline = time.monotonic() + self._init_timeout_s
        offers = [self._receive(f, Loaded, "loading its shard", deadline).num_blocks for f in self._followers]
        agreed = min(num_blocks, *offers)
        for follower in self._followers:
            follower.conn.send(agreed)
        for follower in self._followers:
            self._receive(follower, Ready, "allocating its KV cache", deadline)
        return agreed

    def wrap(self, local: ModelRunner) -> TensorParallelRunner:
        """Rank 0's runner: ``local`` with each step broadcast to the followers first."""
        return TensorParallelRunner(local, self)

    def send_step(self, batch: StepBatch) -> None:
        """Broadcast one step's inputs; raises TensorParallelError if the group cannot run it."""
        self._broadcast(lambda control: send_step(batch, control))

    def send_kv_command(self, command: KVCommand) -> None:
        """Announce a KV gather or scatter (tensor_parallel_kv); the caller holds ``exclusive``."""
        self._broadcast(lambda control: send_kv_command(command, control))

    def _broadcast(self, send: Callable[[dist.ProcessGroup], None]) -> None:
        self.check_alive()
        assert self._control is not None
        try:
            send(self._control)
        except Exception as e:
            raise self.fail(e) from e

    def check_alive(self) -> None:
        """Raise TensorParallelError if the group is closed, broken, or a follower has exited."""
        if self._broken is not None:
            raise TensorParallelError(f"the group is unusable: {self._broken}")
        if self._closed:
            raise TensorParallelError("the group is closed")
        for follower in self._followers:
            if not follower.process.is_alive():
                raise self.fail(None)

    def fail(self, cause: BaseException | None) -> TensorParallelError:
        """Mark the group unusable and return the error that says why, naming a dead follower
        if there is one (given a moment to exit, since a collective often fails first)."""
        error = self._failure(cause)
        self._broken = str(error)
        logger.error("%s", error)
        return error

    def abort(self, reason: str) -> None:
        """Close without SHUTDOWN: the followers are terminated at once."""
        self._broken = self._broken or reason
        self.close()

    def close(self) -> None:
        """Stop the followers (SHUTDOWN, then terminate any left) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None and self._control is not None:
            try:
                send_shutdown(self._control)
            except Exception:  # noqa: BLE001 - the followers are stopped below either way
                logger.warning("tensor parallel: SHUTDOWN broadcast failed", exc_info=True)
            deadline = time.monotonic() + EXIT_TIMEOUT_S
            for follower in self._followers:
                follower.process.join(max(0.0, deadline - time.monotonic()))
        self._finalizer()  # terminates stragglers, leaves the process group
        for follower in self._followers:
            follower.conn.close()

    def _receive(self, follower: _Follower, expected: type[Message], what: str, deadline: float) -> Message:
        """The follower's next start-up message, which must be ``expected``; raises
        TensorParallelError at once if it failed or died, or when the deadline passes."""
        remaining = deadline - time.monotonic()
        ready = wait([follower.conn, follower.process.sentinel], timeout=max(0.0, remaining))
        if follower.conn in ready or follower.conn.poll():
            try:
                message = follower.conn.recv()
            except EOFError:
                message = None
            if isinstance(message, expected):
                return message
            if isinstance(message, Failed):
                raise TensorParallelError(f"failed while {what}:\n{message.error}", rank=follower.rank)
        if not follower.process.is_alive() or follower.process.sentinel in ready:
            follower.process.join(1.0)
            raise TensorParallelError(f"exited with code {follower.process.exitcode} while {what}", rank=follower.rank)
        raise TensorParallelError(f"no answer within {self._init_timeout_s:.0f} s while {what}", rank=follower.rank)

    def _failure(self, cause: BaseException | None) -> TensorParallelError:
        """The error that best explains a failure: a follower's own report or exit code, else ``cause``."""
        exited = wait([f.process.sentinel for f in self._followers], timeout=2.0 if cause is not None else 0.0)
        for follower in self._followers:
            if follower.process.sentinel in exited:
                follower.process.join(1.0)  # its pipes close a moment before its exit status is there
            if follower.process.exitcode is None:
                continue
            reason = f"exited with code {follower.process.exitcode}"
            if follower.conn.poll():
                try:
                    message = follower.conn.recv()
                except EOFError:
                    message = None
                if isinstance(message, Failed):
                    reason = f"failed:\n{message.error}"
            return TensorParallelError(reason, rank=follower.rank)
        return TensorParallelError(f"{type(cause).__name__}: {cause}")


class TensorParallelRunner:
    """Rank 0's model runner: broadcasts each step, then runs the local shard with the others."""

    def __init__(self, local: ModelRunner, group: TensorParallelGroup) -> None:
        self.local = local
        self.group = group

    def execute(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """As ModelRunner.execute: logits [num_sampling_chunks, vocab], gathered over the ranks."""
        batch = build_batch(chunks, self.local.block_size)
        with self.group.exclusive:
            self.group.send_step(batch)
            try:
                return self.local.run(batch)
            except Exception as e:
                raise self.group.fail(e) from e


def _rank_devices(device: torch.device, size: int, device_ids: Sequence[int] | None) -> list[torch.device]:
    if device.type == "cpu":
        return [device] * size
    if device.type != "cuda":
        raise ValueError(f"tensor parallelism runs on cuda or cpu, not {device.type}")
    ids = list(device_ids) if device_ids is not None else [(device.index or 0) + r for r in range(size)]
    if len(ids) != size or len(set(ids)) != size:
        raise ValueError(f"tensor_parallel_size {size} needs {size} distinct CUDA device ids, got {ids}")
    if max(ids) >= torch.cuda.device_count():
        raise ValueError(f"CUDA devices {ids} requested, {torch.cuda.device_count()} visible")
    return [torch.device("cuda", i) for i in ids]


def _abandon(processes: list[BaseProcess]) -> None:
    """Stop followers that did not exit, and leave the process group (also at GC or exit,
    for a group never closed)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    if dist.is_initialized():
        dist.destroy_process_group()
