"""What tensor-parallel rank 0 and its followers say to each other, and how it travels.

Two channels, for two jobs:

- Steps go over a gloo process group on the host (the *control group*), as int64 tensors: a
  fixed-size header (kind and sizes), then, for a step, one payload with every integer of the
  StepBatch. Host tensors, because every rank needs the per-sequence lengths on the host anyway
  (the attention backend loops over them) and so no rank waits on a device-to-host copy.
  Followers sit in the header broadcast between steps, so that group's timeout is long: an idle
  engine is not an error. Rank 0's death is caught by the follower's parent watchdog instead.
- Start-up goes over one multiprocessing pipe per follower, as the small frozen dataclasses
  below. Rank 0 waits on the pipe and the follower's process sentinel together, with a deadline,
  so a follower that fails to load (or dies) is reported at once, with its traceback.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem.workers.model_runner import StepBatch

HEADER_LEN = 5  # kind, num_tokens, num_seqs, max_blocks_per_seq, num_logit_rows


class TensorParallelError(RuntimeError):
    """The tensor-parallel group cannot run a step: a follower failed, died or did not answer.

    Fatal for the engine that owns the group: every later step raises it too."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        self.rank = rank
        where = f"tensor-parallel rank {rank}: " if rank is not None else "tensor parallelism: "
        super().__init__(f"{where}{message}")


class MessageKind(enum.IntEnum):
    STEP = 1
    SHUTDOWN = 2
    GATHER_KV = 3  # every rank sends its kv heads of some blocks to rank 0 (a hand-off leaves)
    SCATTER_KV = 4  # rank 0 sends every rank its kv heads of some blocks (a hand-off arrived)


@dataclass(frozen=True, slots=True)
class KVCommand:
    """A KV hand-off step: GATHER_KV or SCATTER_KV of ``block_ids``; the bytes follow as one
    gather or scatter collective on the default group (tensor_parallel_kv)."""

    kind: MessageKind
    block_ids: tuple[int, ...]


# -- start-up messages, follower -> rank 0 (rank 0 answers Loaded with the agreed block count) ----


@dataclass(frozen=True, slots=True)
class Started:
    """Imports done; the follower now joins the process group."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """The follower's shard is loaded; ``num_blocks`` KV blocks fit its memory budget."""

    num_blocks: int


@dataclass(frozen=True, slots=True)
class Ready:
    """KV cache allocated: the follower waits for steps."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The follower raised; ``error`` is its formatted traceback. It exits right after."""

    error: str


# -- steps, rank 0 -> every follower, over the control group ----------------------------------


def pack_batch(batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER_LEN], payload [3T + 2S + S*B + N]) int64 host tensors of one step."""
    num_seqs = len(batch.query_lens)
    max_blocks = len(batch.block_table[0]) if num_seqs else 0
    header = [MessageKind.STEP, len(batch.token_ids), num_seqs, max_blocks, len(batch.logit_rows)]
    payload = itertools.chain(
        batch.token_ids,
        batch.positions,
        batch.slot_mapping,
        batch.query_lens,
        batch.seq_lens,
        itertools.chain.from_iterable(batch.block_table),
        batch.logit_rows,
    )
    return torch.tensor(header, dtype=torch.int64), torch.tensor(list(payload), dtype=torch.int64)


def payload_len(header: torch.Tensor) -> int:
    _, num_tokens, num_seqs, max_blocks, num_rows = header.tolist()
    return 3 * num_tokens + 2 * num_seqs + num_seqs * max_blocks + num_rows


def unpack_batch(header: torch.Tensor, payload: torch.Tensor) -> StepBatch:
    """The StepBatch that pack_batch encoded."""
    _, num_tokens, num_seqs, max_blocks, num_rows = header.tolist()
    values = payload.tolist()
    cursor = 0

    def take(n: int) -> list[int]:
        nonlocal cursor
        cursor += n
        return values[cursor - n : cursor]

    token_ids, positions, slots = take(num_tokens), take(num_tokens), take(num_tokens)
    query_lens, seq_lens = tuple(take(num_seqs)), tuple(take(num_seqs))
    table = [take(max_blocks) for _ in range(num_seqs)]
    logit_rows = tuple(take(num_rows))
    return StepBatch(token_ids, positions, slots, query_lens, seq_lens, table, logit_rows)


def send_step(batch: StepBatch, group: dist.ProcessGroup) -> None:
    """Rank 0: broadcast one step's inputs to the followers."""
    header, payload = pack_batch(batch)
    dist.broadcast(header, src=0, group=group)
    dist.broadcast(payload, src=0, group=group)


def send_shutdown(group: dist.ProcessGroup) -> None:
    """Rank 0: end every follower's step loop."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = MessageKind.SHUTDOWN
    dist.broadcast(header, src=0, group=group)


def send_kv_command(command: KVCommand, group: dist.ProcessGroup) -> None:
    """Rank 0: announce a KV gather or scatter; the collective that moves the bytes comes next."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1] = command.kind, len(command.block_ids)
    dist.broadcast(header, src=0, group=group)
    dist.broadcast(torch.tensor(command.block_ids, dtype=torch.int64), src=0, group=group)


def receive_step(group: dist.ProcessGroup) -> StepBatch | KVCommand | None:
    """Follower: the next step's inputs or KV command, or None when rank 0 shuts the group down."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    kind = int(header[0])
    if kind == MessageKind.SHUTDOWN:
        return None
    if kind in (MessageKind.GATHER_KV, MessageKind.SCATTER_KV):
        block_ids = torch.empty(int(header[1]), dtype=torch.int64)
        dist.broadcast(block_ids, src=0, group=group)
        return KVCommand(MessageKind(kind), tuple(block_ids.tolist()))
    payload = torch.empty(payload_len(header), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group)
    return unpack_batch(header, payload)


# -- joining the group, on every rank ---------------------------------------------------------

CONTROL_TIMEOUT = timedelta(days=365)  # followers wait here between steps: idling is not an error


def join_group(
    rank: int, size: int, store: dist.Store, device: torch.device, step_timeout_s: float
) -> dist.ProcessGroup:
    """Join the default process group and return the control group.

    The default group (nccl on CUDA, gloo on CPU) is the data plane: the model's all-reduces and
    all-gathers, which the layers issue on it. Its timeout bounds how long rank 0 waits inside a
    step on a follower that died mid-step."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=step_timeout_s), **options
    )
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
