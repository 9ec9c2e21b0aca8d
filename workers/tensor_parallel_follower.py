"""A tensor-parallel follower process: ranks 1..N-1, started by rank 0 with multiprocessing spawn.

Life cycle: Started -> join the process group -> load this rank's weight shard -> Loaded(blocks
that fit here) -> allocate the number of blocks rank 0 agreed on -> Ready -> on CUDA, capture the
decode graphs together with rank 0 -> run every step rank 0 broadcasts (replaying a graph where
rank 0 does), and take its part in every KV gather or scatter (tensor_parallel_kv), until SHUTDOWN.
A follower has no scheduler, block pool or sampler: the block ids in each step come from rank 0,
and its KV cache has the same number of blocks, so the same ids address its share of the kv heads.
It exits when rank 0 dies (a watchdog thread waits on the parent's sentinel), so a killed server
leaves no follower behind.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from tandem.kernels.select import select_backend
from tandem.kvtransfer.kv_cache import allocate_kv_cache, layer_views
from tandem.models.layers import TensorParallel
from tandem.models.loader import load_model
from tandem.workers.config import EngineConfig
from tandem.workers.cuda_graphs import capture_decode_graphs, release_decode_graphs
from tandem.workers.kv_cache_sizing import context_length, kv_cache_spec, num_kv_cache_blocks
from tandem.workers.model_runner import ModelRunner
from tandem.workers.tensor_parallel_kv import follow_kv_command
from tandem.workers.tensor_parallel_wire import Failed, KVCommand, Loaded, Ready, Started, join_group, receive_step

PARENT_GONE_EXIT_CODE = 3


@dataclass(frozen=True, slots=True)
class FollowerSpec:
    """Everything a follower needs, pickled into the spawned process."""

    rank: int
    size: int
    store_port: int  # rank 0's TCPStore, on 127.0.0.1
    device: str  # "cpu" or "cuda:<index>"
    dtype: torch.dtype
    config: EngineConfig
    init_timeout_s: float
    step_timeout_s: float
    num_threads: int | None  # intra-op threads on CPU, so that the ranks share the cores


def run_follower(spec: FollowerSpec, conn: Connection) -> None:
    """Process entry point. Reports any failure to rank 0 over ``conn``, then exits non-zero."""
    _exit_with_parent()
    runner = None
    try:
        conn.send(Started())
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore(
            "127.0.0.1", spec.store_port, spec.size, False, timeout=timedelta(seconds=spec.init_timeout_s)
        )
        control = join_group(spec.rank, spec.size, store, device, spec.step_timeout_s)
        runner, kv_cache, max_model_len = _build_runner(spec, device, conn)
        conn.send(Ready())
        if device.type == "cuda" and not spec.config.enforce_eager:
            # Rank 0 captures the same graphs, in the same order, right after Ready: their
            # all-reduces meet inside the captures, and each later decode replays on every rank.
            runner.graphs = capture_decode_graphs(runner, max_model_len, spec.config.scheduler.max_num_seqs)
        while (message := receive_step(control)) is not None:
            if isinstance(message, KVCommand):
                follow_kv_command(message, kv_cache)
            else:
                runner.run(message)
    except BaseException:
        _report(conn, Failed(traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if runner is not None:
            release_decode_graphs(runner)  # before the communicator they captured goes
        if dist.is_initialized():
            dist.destroy_process_group()


def _build_runner(spec: FollowerSpec, device: torch.device, conn: Connection) -> tuple[ModelRunner, torch.Tensor, int]:
    """Load this rank's shard and allocate the KV cache rank 0 agreed on; (runner, KV cache,
    the engine's context length)."""
    config = spec.config
    loaded = load_model(
        config.model, dtype=spec.dtype, device=device, show_progress=False, tp=TensorParallel(spec.rank, spec.size)
    )
    dtype = next(loaded.model.parameters()).dtype
    kv_spec = kv_cache_spec(loaded.config, config.cache.block_size, dtype, spec.size)
    conn.send(Loaded(num_kv_cache_blocks(kv_spec, config, device)))
    num_blocks = conn.recv()  # the fewest any rank fits
    kv_cache = allocate_kv_cache(kv_spec, num_blocks, device)
    runner = ModelRunner(loaded.model, layer_views(kv_cache), select_backend(device), kv_spec.block_size, device)
    return runner, kv_cache, context_length(config, loaded.max_model_len, num_blocks, kv_spec.block_size)


def _exit_with_parent() -> None:
    """Exit at once when rank 0's process ends, whatever this process is blocked in."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(PARENT_GONE_EXIT_CODE)

    threading.Thread(target=watch, name="tandem-tp-parent-watch", daemon=True).start()


def _report(conn: Connection, message: Failed) -> None:
    try:
        conn.send(message)
    except OSError:
        pass  # rank 0 is gone or stopped listening: nobody to tell
