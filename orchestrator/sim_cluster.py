"""The simulated workers and their performance model. Pure: the event loop in simulator.py owns the clock.

Performance model (everything derives from a `WorkerProfile` and `SimParams`):

- Context worker: one FIFO queue, one prefill at a time; a prompt of n tokens takes
  n / prefill_tokens_per_s (the profile's saturated rate; no batching of several prompts, no
  chunking, no prefix cache). The first output token is emitted when its prefill ends, so
  TTFT = queueing + prefill.
- KV hand-off: prompt_tokens x kv_bytes_per_token / kv_bandwidth_gb_s, from the end of the prefill
  to the sequence joining its generation worker; transfers run in parallel, with no contention.
- Generation worker: continuous batching of at most max_concurrent_seqs sequences; a sequence
  whose KV arrived joins at the next step boundary, the rest wait FIFO for a slot. One step emits
  one token for every running sequence and takes
      step(n) = T_full x (f + (1 - f) x n / max_concurrent_seqs),   T_full = max_concurrent_seqs / decode_tokens_per_s
  i.e. a fixed part (weights read once per step, f = decode_fixed_fraction) plus a part linear in
  the batch (KV reads); a full batch emits exactly decode_tokens_per_s. ITL = the gap between a
  sequence's tokens, so the first decode gap includes the hand-off and any wait for a slot.
- Life cycle: STARTING (holds its GPUs for startup_s, serves nobody) -> SERVING -> DRAINING (no new
  requests, finishes its own) -> STOPPED; a STARTING worker removed stops at once.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from tandem.orchestrator.router import WorkerLoad


@dataclass(frozen=True, slots=True)
class SimParams:
    """What the profile does not say: hand-off cost, start-up delay, routing, the decode step shape."""

    startup_s: float = 60.0  # from a scale-up decision to the new worker serving
    kv_bytes_per_token: float = 131_072.0  # e.g. 32 layers x 2 (K, V) x 8 KV heads x 128 dims x 2 bytes
    kv_bandwidth_gb_s: float = 10.0  # measured context -> generation bandwidth, GB/s (1e9 bytes)
    decode_fixed_fraction: float = 0.5  # f above: the share of a full-batch step that does not depend on the batch
    router_policy: str = "least_load"  # a name of router.POLICIES
    seed: int = 0  # only the workload draws random numbers; kept here for the report

    def __post_init__(self) -> None:
        if self.startup_s < 0 or self.kv_bytes_per_token < 0 or self.kv_bandwidth_gb_s <= 0:
            raise ValueError("startup_s and kv_bytes_per_token must be >= 0, kv_bandwidth_gb_s > 0")
        if not 0 <= self.decode_fixed_fraction <= 1:
            raise ValueError("decode_fixed_fraction must be within [0, 1]")

    def transfer_s(self, prompt_tokens: int) -> float:
        return prompt_tokens * self.kv_bytes_per_token / (self.kv_bandwidth_gb_s * 1e9)


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Flight:
    """One request in the cluster: where it is and the latencies measured so far."""

    __slots__ = ("arrival_s", "prompt_tokens", "output_tokens", "generation", "first_token_s", "last_token_s",
                 "left", "gap_sum", "gaps", "done_s")

    def __init__(self, arrival_s: float, prompt_tokens: int, output_tokens: int) -> None:
        self.arrival_s, self.prompt_tokens, self.output_tokens = arrival_s, prompt_tokens, output_tokens
        self.generation: GenerationWorker | None = None
        self.first_token_s = self.last_token_s = self.done_s = -1.0
        self.left = output_tokens - 1  # tokens the decode steps still owe
        self.gap_sum, self.gaps = 0.0, 0


class Worker:
    gpus: float

    def __init__(self, worker_id: str, launched_s: float, ready_s: float, gpus: float) -> None:
        self.worker_id, self.launched_s, self.ready_s, self.gpus = worker_id, launched_s, ready_s, gpus
        self.state = State.STARTING if ready_s > launched_s else State.SERVING
        self.stopped_s: float | None = None

    def busy(self) -> int:
        raise NotImplementedError

    def stop_if_drained(self, now: float) -> None:
        if self.state is State.DRAINING and self.busy() == 0:
            self.state, self.stopped_s = State.STOPPED, now

    def gpu_seconds(self, end_s: float) -> float:
        return ((self.stopped_s if self.stopped_s is not None else end_s) - self.launched_s) * self.gpus


class ContextWorker(Worker):
    def __init__(self, worker_id: str, launched_s: float, ready_s: float, gpus: float, tokens_per_s: float) -> None:
        super().__init__(worker_id, launched_s, ready_s, gpus)
        self.tokens_per_s = tokens_per_s
        self.queue: deque[Flight] = deque()
        self.current: Flight | None = None
        self.current_done_s = 0.0

    def busy(self) -> int:
        return len(self.queue) + (self.current is not None)

    def queued_tokens(self, now: float) -> int:
        left = (self.current_done_s - now) * self.tokens_per_s if self.current is not None else 0.0
        return sum(f.prompt_tokens for f in self.queue) + max(int(left), 0)

    def load(self, now: float) -> WorkerLoad:
        return WorkerLoad(self.worker_id, "context", 1 - (self.current is not None), 1, int(self.current is not None),
                          len(self.queue), self.queued_tokens(now), self.state is State.SERVING)

    def start_next(self, now: float) -> float | None:
        """Begin the next queued prefill if idle; its end time, or None."""
        if self.current is not None or not self.queue:
            return None
        self.current = self.queue.popleft()
        self.current_done_s = now + self.current.prompt_tokens / self.tokens_per_s
        return self.current_done_s


class GenerationWorker(Worker):
    def __init__(self, worker_id: str, launched_s: float, ready_s: float, gpus: float, capacity: int,
                 full_step_s: float, fixed_fraction: float) -> None:
        super().__init__(worker_id, launched_s, ready_s, gpus)
        self.capacity, self.full_step_s, self.fixed = capacity, full_step_s, fixed_fraction
        self.running: list[Flight] = []
        self.waiting: deque[Flight] = deque()  # KV arrived, no slot yet
        self.inbound = 0  # routed here, still prefilling or in transfer
        self.stepping = False

    def busy(self) -> int:
        return len(self.running) + len(self.waiting) + self.inbound

    def load(self) -> WorkerLoad:
        free = max(self.capacity - self.busy(), 0)
        return WorkerLoad(self.worker_id, "generation", free, self.capacity, len(self.running),
                          len(self.waiting) + self.inbound, 0, self.state is State.SERVING)

    def step_s(self, n: int) -> float:
        return self.full_step_s * (self.fixed + (1 - self.fixed) * n / self.capacity)

    def start_step(self, now: float) -> float | None:
        """Admit waiting sequences into free slots and begin a step; its end time, or None when idle."""
        while self.waiting and len(self.running) < self.capacity:
            self.running.append(self.waiting.popleft())
        if not self.running:
            self.stepping = False
            return None
        self.stepping = True
        return now + self.step_s(len(self.running))

    def finish_step(self, now: float, gaps: list[float]) -> list[Flight]:
        """Every running sequence emits a token (its gap goes to `gaps`); the sequences that finished."""
        done, still = [], []
        for f in self.running:
            gap = now - f.last_token_s
            gaps.append(gap)
            f.gap_sum += gap
            f.gaps += 1
            f.last_token_s = now
            f.left -= 1
            (still if f.left > 0 else done).append(f)
        self.running = still
        for f in done:
            f.done_s = now
        return done
