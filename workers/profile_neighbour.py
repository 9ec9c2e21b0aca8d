"""The other role, running beside `tandem profile --colocated`: for workers that share a host.

When a context and a generation worker share one host's cores and memory bandwidth, each runs
slower than alone: measured on the 2-core CI machine, a prefill beside a decoding process took
about 20% longer (docs/performance.md, the simulator check). A profile measured alone then makes
the planner and the simulator optimistic. With a neighbour, the profiler times its prefills
while the neighbour decodes, and its decode steps while the neighbour prefills: what each role
meets in a colocated cluster. The neighbour is a process of its own (its own engine on the same
model and thread count), switched between modes over a pipe; it never outlives the profiler.
"""
from __future__ import annotations

import multiprocessing
import random
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

READY_TIMEOUT_S = 300.0  # load torch and the model on a busy machine
DECODE_BATCH = 4  # sequences the neighbour keeps decoding
DECODE_TOKENS = 64
PREFILL_TOKENS = 128


class Neighbour:
    """A process running an engine of the same model in a mode: ``idle``, ``decode``, ``prefill``."""

    def __init__(self, model: str | None, device: str, dtype: str, kv_cache_bytes: int | None, num_threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process: BaseProcess = context.Process(
            target=_serve, args=(theirs, model, device, dtype, kv_cache_bytes, num_threads),
            name="tandem-profile-neighbour", daemon=True,
        )
        self._process.start()
        theirs.close()
        if not self._conn.poll(READY_TIMEOUT_S) or self._conn.recv() != "ready":
            self.close()
            raise RuntimeError("the profile's neighbour engine did not start")

    def switch(self, mode: str) -> None:
        """Run ``mode`` from now on; returns once the neighbour has switched."""
        self._conn.send(mode)
        if not self._conn.poll(60) or self._conn.recv() != mode:
            raise RuntimeError(f"the profile's neighbour did not switch to {mode}")

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self) -> dict[str, int]:
        """Stop the neighbour; returns the engine steps it ran in each mode (empty if it could not say)."""
        steps: dict[str, int] = {}
        if self._process.is_alive():
            try:
                self._conn.send("stop")
                if self._conn.poll(10):
                    steps = self._conn.recv()
            except (OSError, EOFError):
                pass
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        return steps


def _serve(conn: Connection, model: str | None, device: str, dtype: str, kv_cache_bytes: int | None,
           num_threads: int) -> None:
    import torch

    from tandem.workers.config import CacheConfig
    from tandem.workers.llm import LLM
    from tandem.workers.sampling_params import SamplingParams

    torch.set_num_threads(num_threads)
    engine = LLM(model, device=device, dtype=dtype, show_progress=False, cache=CacheConfig(num_bytes=kv_cache_bytes)).engine
    rng, mode, count = random.Random(7), "idle", 0
    steps: dict[str, int] = {"decode": 0, "prefill": 0}
    conn.send("ready")
    while True:
        if conn.poll(0.05 if mode == "idle" else 0):
            mode = conn.recv()
            if mode == "stop":
                conn.send(steps)
                return
            for request_id in list(engine.requests):  # the last mode's work must not run on into this one
                engine.abort(request_id)
            conn.send(mode)
        if mode == "idle":
            continue
        if not engine.has_unfinished_requests():
            batch, length, max_tokens = (DECODE_BATCH, 16, DECODE_TOKENS) if mode == "decode" else (1, PREFILL_TOKENS, 1)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            for _ in range(batch):
                count += 1
                engine.add_request(f"neighbour-{count}", [rng.randrange(1, engine.vocab_size) for _ in range(length)], params)
        engine.step()
        steps[mode] += 1
