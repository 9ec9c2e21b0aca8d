"""KV-block READ throughput of TransferEngine against a raw one-descriptor NIXL READ (the ceiling).

Two processes: the owner (a spawned child) holds a KV cache in the model's block-major layout
([num_blocks, layers, 2, block_size, kv_heads, head_dim], default SmolLM2-135M: 30 layers, 3 kv
heads, head dim 64, 16-token blocks, bf16: 360 KiB a block); this process reads n blocks of it
with ``TransferEngine.read_blocks``, once with block ids contiguous on both sides (one descriptor)
once scattered at random on both sides (about one descriptor a block), once as a prompt's hand-off
after both pools have churned under serving (``sim_block_runs.py``, up to an eighth of the cache),
and, in the same run,
the same number of bytes with one raw NIXL descriptor. Each number is the median wall time of
at least ``--repeats`` calls (more for short ones) after one warm-up; each size's first scattered read is checked (per-block
sums and first words, as int32).

    python scripts/bench_transfer.py                                  # CPU, bf16, up to 4096 blocks
    python scripts/bench_transfer.py --device cuda --src-gpu 0 --dst-gpu 1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time

import numpy as np
import torch

from tandem.kvtransfer.kv_cache import KVCacheSpec, allocate_kv_cache
from tandem.kvtransfer.nixl_transfer import PeerMetadata, TransferEngine

from sim_block_runs import churned_handoffs

SIZES = [1, 4, 16, 64, 256, 1024, 4096]
_STRIDE = 7919  # int32 word w of block b holds w + b * _STRIDE


def fill_blocks(kv_cache: torch.Tensor) -> None:
    words = kv_cache.view(kv_cache.shape[0], -1).view(torch.int32)  # [num_blocks, bytes_per_block / 4]
    num_blocks, num_words = words.shape
    words.copy_(torch.arange(num_words, dtype=torch.int32, device=kv_cache.device).expand(num_blocks, num_words))
    words.add_(torch.arange(num_blocks, dtype=torch.int32, device=kv_cache.device)[:, None] * _STRIDE)


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def check_blocks(kv_cache: torch.Tensor, local_ids: list[int], remote_ids: list[int]) -> None:
    words = kv_cache.view(kv_cache.shape[0], -1).view(torch.int32)[local_ids].to(torch.int64)
    num_words = words.shape[1]
    remote = torch.tensor(remote_ids, dtype=torch.int64)
    first = remote * _STRIDE  # no int32 overflow below 270k blocks of 360 KiB
    expected_sum = first * num_words + num_words * (num_words - 1) // 2
    if not (torch.equal(words[:, 0].cpu(), first) and torch.equal(words.sum(1).cpu(), expected_sum)):
        raise SystemExit(f"checksum mismatch after reading {len(local_ids)} blocks")


def serve_owner(spec: KVCacheSpec, num_blocks: int, device: str, out: mp.Queue, commands, num_threads: int) -> None:
    """The block owner: holds the cache and, on request, stages blocks (timed here) or unstages them."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    kv_cache = allocate_kv_cache(spec, num_blocks, torch.device(device))
    fill_blocks(kv_cache)
    _sync(kv_cache)  # NIXL copies on its own streams: the fill must have landed first
    engine = TransferEngine("bench-owner", kv_cache, worker_id="owner", epoch=1, num_threads=num_threads,
                            staging_blocks=num_blocks, stage_min_runs=0)
    out.put(engine.metadata())
    while (command := commands.recv()) is not None:
        op, block_ids = command
        if op == "stage":
            seconds = median_seconds(lambda: engine.unstage(engine.stage(block_ids), len(block_ids)), 5)
            commands.send((engine.stage(block_ids), seconds))
        else:
            engine.unstage(*block_ids)
            commands.send(None)
    engine.close()


class RawReader:
    """One-descriptor NIXL READs from the owner's region into ours: the ceiling."""

    def __init__(self, kv_cache: torch.Tensor, peer: PeerMetadata, num_threads: int) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent = nixl_agent("bench-raw", nixl_agent_config(backends=[]))
        params = {"num_threads": str(num_threads)} if num_threads > 0 else {}
        self.agent.create_backend("UCX", params)
        self.mem = "VRAM" if kv_cache.is_cuda else "DRAM"
        self.dev = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
        self.base, self.peer = kv_cache.data_ptr(), peer
        nbytes = kv_cache.numel() * kv_cache.element_size()
        self.reg = self.agent.register_memory([(self.base, nbytes, self.dev, "")], self.mem)
        self.remote = self.agent.add_remote_agent(peer.agent_metadata)

    def read(self, nbytes: int) -> None:
        local = self.agent.get_xfer_descs([(self.base, nbytes, self.dev)], self.mem)
        remote = self.agent.get_xfer_descs([(self.peer.base_address, nbytes, self.peer.device_id)], self.peer.memory_type)
        handle = self.agent.initialize_xfer("READ", local, remote, self.remote)
        state = self.agent.transfer(handle)
        while state == "PROC":
            state = self.agent.check_xfer_state(handle)
        if state != "DONE":
            raise RuntimeError("raw NIXL READ failed")
        self.agent.release_xfer_handle(handle)


def median_seconds(fn, repeats: int, min_seconds: float = 0.25, max_repeats: int = 200) -> float:
    """Median of at least ``repeats`` timed calls (more for short calls, up to ``min_seconds``)."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cap_blocks(args: argparse.Namespace, bytes_per_block: int) -> int:
    if args.device == "cuda":
        free = min(torch.cuda.mem_get_info(g)[0] for g in {args.src_gpu, args.dst_gpu})
        budget = int(free * 0.8) // (2 if args.src_gpu == args.dst_gpu else 1)
    else:
        budget = int(args.mem_gb * 1e9) // 2  # two caches, one a process
    return max(1, min(args.max_blocks, budget // bytes_per_block))


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    spec = KVCacheSpec(args.layers, args.kv_heads, args.head_dim, args.block_size, getattr(torch, args.dtype))
    num_blocks = cap_blocks(args, spec.bytes_per_block)
    src = f"cuda:{args.src_gpu}" if args.device == "cuda" else "cpu"
    dst = torch.device(f"cuda:{args.dst_gpu}" if args.device == "cuda" else "cpu")
    if dst.type == "cuda":
        torch.cuda.set_device(dst)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    commands, owner_commands = ctx.Pipe()
    owner = ctx.Process(target=serve_owner, args=(spec, num_blocks, src, out, owner_commands, args.num_threads), daemon=True)
    owner.start()
    try:
        kv_cache = allocate_kv_cache(spec, num_blocks, dst)
        peer = out.get(timeout=300)
        engine = TransferEngine("bench-reader", kv_cache, worker_id="reader", epoch=1, num_threads=args.num_threads,
                                staging_blocks=num_blocks, stage_min_runs=0)
        engine.add_peer(peer)
        raw = RawReader(kv_cache, peer, args.num_threads)
        rows = [measure(n, engine, raw, kv_cache, commands, args) for n in SIZES if n <= num_blocks]
        engine.close()
    finally:
        commands.send(None)
        owner.join(timeout=30)
        if owner.is_alive():
            owner.kill()
    config = {"device": args.device, "dtype": args.dtype, "bytes_per_block": spec.bytes_per_block,
              "cache_blocks": num_blocks, "num_threads": args.num_threads, "repeats": args.repeats,
              "torch": torch.__version__, "host": platform.node()}
    return [r for size_rows in rows for r in size_rows], config


def measure(n: int, engine: TransferEngine, raw: RawReader, kv_cache: torch.Tensor, commands, args) -> list[dict]:
    rng = np.random.default_rng(n)
    nbytes = n * engine.bytes_per_block
    ceiling = nbytes / median_seconds(lambda: raw.read(nbytes), args.repeats) / 1e9
    layouts = {
        "contiguous": (list(range(n)), list(range(n))),
        "scattered": (rng.permutation(engine.num_blocks)[:n].tolist(), rng.permutation(engine.num_blocks)[:n].tolist()),
    }
    if 16 <= n <= engine.num_blocks // 8:
        layouts["after churn"] = churned_layout(n, engine.num_blocks, kv_cache.shape[3])
    rows = []
    for name, (remote, local) in layouts.items():
        kv_cache.view(kv_cache.shape[0], -1)[local] = 0
        _sync(kv_cache)  # else the zeroing kernel may land after the READ and fail the check
        stats = engine.read_blocks("owner", 1, remote, local, deadline=time.monotonic() + 60)
        check_blocks(kv_cache, local, remote)
        seconds = median_seconds(lambda: engine.read_blocks("owner", 1, remote, local, deadline=time.monotonic() + 60), args.repeats)
        rows.append(row(n, nbytes, name, stats.num_descriptors, seconds, ceiling))
    # Scattered again, through staging: the owner gathers (timed in its process), we READ one
    # descriptor into our staging slots and scatter; the sum is what a hand-off costs.
    remote, local = layouts["scattered"]
    commands.send(("stage", remote))
    slot, stage_seconds = commands.recv()
    kv_cache.view(kv_cache.shape[0], -1)[local] = 0
    _sync(kv_cache)
    stats = engine.read_blocks("owner", 1, remote, local, deadline=time.monotonic() + 60, remote_staged_at=slot)
    check_blocks(kv_cache, local, remote)
    seconds = median_seconds(
        lambda: engine.read_blocks("owner", 1, remote, local, deadline=time.monotonic() + 60, remote_staged_at=slot), args.repeats
    )
    commands.send(("unstage", (slot, n)))
    commands.recv()
    rows.append(row(n, nbytes, "scattered, staged", stats.num_descriptors, stage_seconds + seconds, ceiling))
    return rows


def churned_layout(n: int, num_blocks: int, block_size: int) -> tuple[list[int], list[int]]:
    """The first n blocks of a hand-off of at least n blocks, both pools num_blocks, after churn."""
    handoffs = churned_handoffs(num_blocks, num_blocks, prompt_tokens=n * block_size, output_tokens=256,
                                num_handoffs=50, block_size=block_size, seed=n)
    remote, local = next((r, l) for r, l in handoffs if len(r) >= n)
    return remote[:n], local[:n]


def row(n: int, nbytes: int, ids: str, descriptors: int, seconds: float, ceiling: float) -> dict:
    gbps = nbytes / seconds / 1e9
    return {"blocks": n, "bytes": nbytes, "ids": ids, "descriptors": descriptors, "gbps_layout": round(gbps, 3),
            "gbps_ceiling": round(ceiling, 3), "pct_of_ceiling": round(100 * gbps / ceiling, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--src-gpu", type=int, default=0, help="owner's GPU (cuda)")
    parser.add_argument("--dst-gpu", type=int, default=0, help="reader's GPU (cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-blocks", type=int, default=4096, help="cache blocks a side; capped to what fits")
    parser.add_argument("--mem-gb", type=float, default=8.0, help="CPU: memory for both caches together")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=0, help="UCX backend worker threads (0: NIXL default)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    rows, config = run(args)
    print(", ".join(f"{k} {v}" for k, v in config.items()))
    print("| blocks | bytes | ids | descriptors | GB/s (layout) | GB/s (ceiling) | % of ceiling |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['bytes']} | {r['ids']} | {r['descriptors']} | {r['gbps_layout']} | "
              f"{r['gbps_ceiling']} | {r['pct_of_ceiling']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
