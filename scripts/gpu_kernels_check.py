"""The GPU attention kernels on a GPU: each checked against the torch reference, then timed.

Llama-3-8B-shaped attention (32 query heads, 8 kv heads, head_dim 128, block 16) over a
block-major cache of several layers, so every per-layer view is strided as in serving, with
shuffled block tables. Checks: the Triton KV store (exact bytes), Triton paged decode (bf16 and
fp32; batch 1/8/32/128 at a 1k context), the Triton block gather/scatter of KV transfer (exact
bytes), and FlashInfer decode and prefill when flashinfer imports. Times are medians of CUDA-event
timings with L2 flushed before each run; GB/s counts the KV bytes a kernel must read (decode) or
read plus write (store, gather/scatter), next to a plain device copy measured in the same run as
the ceiling. Prints one JSON line per check.

    python scripts/gpu_kernels_check.py            # on a machine with CUDA
    python scripts/gpu_kernels_check.py --batches 1 32 --iters 50 --only decode
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from tandem.kernels.interface import AttentionMetadata
from tandem.kernels.torch_reference import TorchReferenceBackend
from tandem.kvtransfer.kv_cache import KVCacheSpec, allocate_kv_cache, layer_views

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
CHECKS = ("copy", "store", "decode", "gather", "flashinfer")


def time_us(fn: Callable[[], object], iters: int, flush: torch.Tensor) -> float:
    """Median microseconds of fn over iters runs, each after a write that evicts L2."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def emit(**fields: object) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}), flush=True)


def cache(num_blocks: int, dtype: torch.dtype, num_layers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A random block-major cache of num_layers layers and its (strided) view of layer 1."""
    full = allocate_kv_cache(KVCacheSpec(num_layers, KV_HEADS, HEAD_DIM, BLOCK, dtype), num_blocks, torch.device("cuda"))
    full.normal_()
    return full, layer_views(full)[1]


def step(cached: list[int], query_lens: list[int], num_blocks: int, gen: torch.Generator) -> AttentionMetadata:
    """A step appending query_lens[i] tokens after cached[i]; blocks shuffled over the whole cache."""
    seq_lens = [c + q for c, q in zip(cached, query_lens)]
    needed = [-(-n // BLOCK) for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen)[: sum(needed)].tolist()
    table = torch.zeros(len(needed), max(needed), dtype=torch.int32)
    at = 0
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(perm[at : at + n])
        at += n
    slots = [int(table[i, p // BLOCK]) * BLOCK + p % BLOCK for i, (c, n) in enumerate(zip(cached, seq_lens)) for p in range(c, n)]
    starts = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=table.cuda(),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        block_size=BLOCK,
    )


def check_copy(args: argparse.Namespace, flush: torch.Tensor) -> None:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), args.iters, flush)
    emit(check="copy_ceiling", bytes=2 * src.numel(), median_us=us, gb_s=2 * src.numel() / us / 1e3)


def check_store(args: argparse.Namespace, flush: torch.Tensor) -> None:
    from tandem.kernels.triton_kv import store_kv

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for num_tokens in (128, 8192):
            num_blocks = num_tokens // BLOCK * 2 + 64
            full, layer = cache(num_blocks, dtype)
            expected = full.clone()
            meta = step([0] * (num_tokens // 128), [128] * (num_tokens // 128), num_blocks, gen)
            qkv = torch.randn(num_tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype)
            key = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(num_tokens, KV_HEADS, HEAD_DIM)
            value = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(num_tokens, KV_HEADS, HEAD_DIM)
            store_kv(layer, key, value, meta.slot_mapping, BLOCK)
            TorchReferenceBackend().store_kv(layer_views(expected)[1], key, value, meta)
            exact = torch.equal(full, expected)
            ref = TorchReferenceBackend()
            us = time_us(lambda: store_kv(layer, key, value, meta.slot_mapping, BLOCK), args.iters, flush)
            ref_us = time_us(lambda: ref.store_kv(layer, key, value, meta), args.iters, flush)
            moved = 2 * 2 * key.numel() * dtype.itemsize  # K and V, read and written
            emit(check="triton_store", dtype=str(dtype)[6:], tokens=num_tokens, exact=exact, median_us=us,
                 gb_s=moved / us / 1e3, torch_reference_us=ref_us)


def decode_case(batch: int, context: int, dtype: torch.dtype, gen: torch.Generator):
    num_blocks = batch * (context // BLOCK + 1) + 64
    full, layer = cache(num_blocks, dtype)
    meta = step([context - 1] * batch, [1] * batch, num_blocks, gen)
    query = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * dtype.itemsize
    return full, layer, meta, query, kv_bytes


def check_decode(args: argparse.Namespace, flush: torch.Tensor) -> None:
    from tandem.kernels.triton_attention import paged_decode_attention

    gen = torch.Generator().manual_seed(1)
    scale = HEAD_DIM**-0.5
    for dtype in (torch.bfloat16, torch.float32):
        for batch in args.batches:
            full, layer, meta, query, kv_bytes = decode_case(batch, args.context, dtype, gen)
            ref = TorchReferenceBackend()

            def triton() -> torch.Tensor:
                return paged_decode_attention(query, layer, meta.block_tables, meta.seq_lens, scale, args.context)

            want = ref.attend(query.float(), layer.float(), meta, scale)
            err = (triton().float() - want).abs().max().item()
            us = time_us(triton, args.iters, flush)
            ref_us = time_us(lambda: ref.attend(query, layer, meta, scale), args.iters, flush)
            emit(check="triton_decode", dtype=str(dtype)[6:], batch=batch, context=args.context, max_abs_err=err,
                 ok=err < (2e-2 if dtype == torch.bfloat16 else 1e-4), median_us=us, kv_gb_s=kv_bytes / us / 1e3,
                 torch_reference_us=ref_us)


def check_gather(args: argparse.Namespace, flush: torch.Tensor) -> None:
    from tandem.kernels.triton_kv import gather_rows, scatter_rows
    from tandem.kvtransfer.staging import as_words

    gen = torch.Generator().manual_seed(2)
    full, _ = cache(2048, torch.bfloat16, num_layers=32)  # Llama-8B block: 2 MiB across 32 layers
    rows = full.view(full.shape[0], -1).view(torch.uint8)
    for count in (16, 512):
        ids = torch.randperm(rows.shape[0], generator=gen)[:count].cuda()
        slots = torch.empty(count, rows.shape[1], dtype=torch.uint8, device="cuda")
        gather_rows(as_words(slots), as_words(rows), ids)
        exact = torch.equal(slots, rows[ids])
        back = torch.zeros_like(rows)
        scatter_rows(as_words(back), ids, as_words(slots))
        exact = exact and torch.equal(back[ids], rows[ids])
        moved = 2 * count * rows.shape[1]
        us = time_us(lambda: gather_rows(as_words(slots), as_words(rows), ids), args.iters, flush)
        scatter_us = time_us(lambda: scatter_rows(as_words(back), ids, as_words(slots)), args.iters, flush)
        index_us = time_us(lambda: torch.index_select(as_words(rows), 0, ids, out=as_words(slots)), args.iters, flush)
        emit(check="triton_gather_scatter", blocks=count, bytes_per_block=rows.shape[1], exact=exact,
             gather_us=us, gather_gb_s=moved / us / 1e3, scatter_us=scatter_us, scatter_gb_s=moved / scatter_us / 1e3,
             index_select_us=index_us)


def check_flashinfer(args: argparse.Namespace, flush: torch.Tensor) -> None:
    from tandem.kernels.select import build_backend
    from tandem.kernels.interface import BackendKind

    try:
        backend = build_backend(BackendKind.FLASHINFER)
    except ImportError as e:
        emit(check="flashinfer", skipped=f"does not import: {e}")
        return
    import flashinfer

    gen = torch.Generator().manual_seed(3)
    scale = HEAD_DIM**-0.5
    ref = TorchReferenceBackend()
    for batch in args.batches:
        full, layer, meta, query, kv_bytes = decode_case(batch, args.context, torch.bfloat16, gen)
        want = ref.attend(query.float(), layer.float(), meta, scale)
        err = (backend.attend(query, layer, meta, scale).float() - want).abs().max().item()
        us = time_us(lambda: backend.attend(query, layer, meta, scale), args.iters, flush)  # planned once
        emit(check="flashinfer_decode", version=flashinfer.__version__, dtype="bfloat16", batch=batch,
             context=args.context, max_abs_err=err, ok=err < 2e-2, median_us=us, kv_gb_s=kv_bytes / us / 1e3)
    prompts = 4
    full, layer, _, _, _ = decode_case(prompts, args.context, torch.bfloat16, gen)
    meta = step([0] * prompts, [args.context] * prompts, full.shape[0], gen)
    query = torch.randn(prompts * args.context, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    want = ref.attend(query.float(), layer.float(), meta, scale)
    err = (backend.attend(query, layer, meta, scale).float() - want).abs().max().item()
    us = time_us(lambda: backend.attend(query, layer, meta, scale), args.iters, flush)
    ref_us = time_us(lambda: ref.attend(query, layer, meta, scale), args.iters, flush)
    emit(check="flashinfer_prefill", dtype="bfloat16", prompts=prompts, prompt_len=args.context, max_abs_err=err,
         ok=err < 2e-2, median_us=us, torch_reference_us=ref_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128], help="decode batch sizes")
    parser.add_argument("--context", type=int, default=1024, help="context length of every decode sequence")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--only", choices=CHECKS, nargs="+", default=list(CHECKS), help="checks to run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels_check needs a CUDA device")
    emit(check="device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # larger than any L2
    runners = {"copy": check_copy, "store": check_store, "decode": check_decode, "gather": check_gather,
               "flashinfer": check_flashinfer}
    for name in args.only:
        runners[name](args, flush)


if __name__ == "__main__":
    main()
