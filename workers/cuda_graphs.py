"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured at start.

A decode step of an 8B model launches several hundred small kernels; launched one by one from
Python they cost more than the step's memory traffic at small batches. A captured graph launches
them all at once. The price is static shapes, so each bucket owns fixed input buffers:

- a step of ``n`` sequences runs the smallest bucket ``B >= n``; rows ``n..B`` are padding whose
  KV slot is -1 (the store kernel skips it) and whose context is one token of block 0 (finite
  garbage, dropped);
- the block table is ``max_model_len / block_size`` wide; attention is captured once per context
  bucket (``CONTEXT_BUCKETS`` below max_model_len, then max_model_len itself) as if every sequence
  were that long, which fixes the split-KV kernel's grid. A step replays the smallest bucket that
  holds its longest sequence, so a 1k-token context is split for 2k tokens, not for 32k (where most
  splits would sit idle and the busy ones would read sixteen times as much each).

Only decode-only steps replay; prefills and mixed steps run eagerly. Capture needs an attention
backend whose decode reads lengths and block tables from the device only (Triton's); the graphs
use it even when eager steps use FlashInfer.

Under tensor parallelism every rank captures the same buckets in the same order at start (rank 0
in the engine, the others in tensor_parallel_follower), so the layers' NCCL all-reduces and the LM
head's all-gather are inside the graphs; each rank then replays the bucket the broadcast step
picks, and the collectives meet as in an eager step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.kernels.interface import AttentionBackend, AttentionMetadata, ForwardContext
from tandem.workers.model_runner import pinned

if TYPE_CHECKING:
    from tandem.workers.model_runner import DeviceInputs, ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
CONTEXT_BUCKETS = (512, 2048, 8192)


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: tuple[torch.Tensor, ...],
        backend: AttentionBackend,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.context_buckets = tuple(c for c in CONTEXT_BUCKETS if c < max_model_len) + (max_model_len,)
        largest = self.batch_sizes[-1]
        self.table_width = -(-max_model_len // block_size)
        self._input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self._positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self._slots = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self._seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros((largest, self.table_width), dtype=torch.int32, device=device)
        self._query_start = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (batch, context)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool (smaller graphs reuse it)."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size, context in ((s, c) for s in reversed(self.batch_sizes) for c in reversed(self.context_buckets)):
            ctx = ForwardContext(self.backend, self._metadata(size, context), self.kv_caches)
            args = (self._input_ids[:size], self._positions[:size], ctx)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up: Triton compiles, allocators settle
                for _ in range(2):
                    self.model.compute_logits(self.model(*args))
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(*args))
            self._graphs[(size, context)] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s x contexts %s in %.1f s",
            list(self.batch_sizes), list(self.context_buckets), time.perf_counter() - started,
        )

    def release(self) -> None:
        """Free every graph and wait for the device; no replay afterwards."""
        for graph, _ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        torch.cuda.synchronize(self.device)

    def can_run(self, query_lens: Sequence[int], num_blocks: int) -> bool:
        """A decode-only step that fits the largest captured bucket and the table width."""
        return (
            bool(self._graphs)
            and 0 < len(query_lens) <= self.max_batch_size
            and num_blocks <= self.table_width
            and all(q == 1 for q in query_lens)
        )

    def run(
        self, token_ids: list[int], positions: list[int], slots: list[int], seq_lens: Sequence[int],
        block_table: list[list[int]], device_inputs: DeviceInputs | None = None,
    ) -> torch.Tensor:
        """Logits [n, vocab] of a decode step of n sequences (valid until the next replay).
        ``device_inputs``: rows whose input id is a token still on the device (the overlapped
        step), copied into the static input buffer on the device, after the host's ids."""
        n = len(token_ids)
        size = next(b for b in self.batch_sizes if b >= n)
        longest = max(seq_lens)
        graph, logits = self._graphs[(size, next(c for c in self.context_buckets if c >= longest))]
        width = len(block_table[0])
        self._input_ids[:n].copy_(pinned(token_ids, torch.int64), non_blocking=True)
        if device_inputs is not None:
            device_inputs.scatter_into(self._input_ids)  # one token per row: token index = row
        self._positions[:n].copy_(pinned(positions, torch.int64), non_blocking=True)
        self._slots[:n].copy_(pinned(slots, torch.int64), non_blocking=True)
        self._seq_lens[:n].copy_(pinned(list(seq_lens), torch.int32), non_blocking=True)
        self._block_tables[:n, :width].copy_(pinned(block_table, torch.int32), non_blocking=True)
        if size > n:  # padding rows: no KV write, one finite token of context
            self._slots[n:size].fill_(-1)
            self._seq_lens[n:size].fill_(1)
            self._block_tables[n:size, 0].fill_(0)
        graph.replay()
        return logits[:n]

    def _metadata(self, size: int, context: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self._query_start[: size + 1],
            seq_lens=self._seq_lens[:size],
            block_tables=self._block_tables[:size],
            slot_mapping=self._slots[:size],
            query_lens_cpu=(1,) * size,
            seq_lens_cpu=(context,) * size,  # shapes the split-KV grid for any real length up to it
            block_size=self.block_size,
        )


def capture_decode_graphs(runner: ModelRunner, max_model_len: int, max_num_seqs: int) -> DecodeGraphs | None:
    """Decode graphs for ``runner``'s model up to ``max_num_seqs`` sequences, or None (logged)
    when its attention backend cannot be captured."""
    backend = graph_backend(runner.backend)
    if backend is None:
        logger.info("no decode CUDA graphs: the %s attention backend cannot be captured", runner.backend.kind.value)
        return None
    sizes = [size for size in DEFAULT_BATCH_SIZES if size < max_num_seqs] + [max_num_seqs]
    graphs = DecodeGraphs(runner.model, runner.kv_caches, backend, runner.block_size, max_model_len, runner.device, sizes)
    graphs.capture()
    return graphs


def release_decode_graphs(runner: ModelRunner) -> None:
    """Free ``runner``'s decode graphs and wait for the device. Under tensor parallelism this must
    come before the process group is destroyed: the graphs hold NCCL work of its communicator."""
    graphs, runner.graphs = runner.graphs, None
    if graphs is not None:
        graphs.release()


def graph_backend(backend: AttentionBackend) -> AttentionBackend | None:
    """The backend decode graphs capture with, or None when none can be captured here."""
    from tandem.kernels.interface import BackendKind

    if backend.kind is BackendKind.TRITON:
        return backend
    if backend.kind is BackendKind.FLASHINFER:
        try:
            from tandem.kernels.triton_backend import TritonBackend
        except ImportError:
            return None
        return TritonBackend()
    return None
