"""The cold-start phase of scripts/bench_gpu.py: a worker's creation to its first token, with the
weights read from local safetensors files that are not in the page cache.

The parent (``run_coldstart``) writes a random Llama checkpoint of ``--coldstart-layers`` layers as
sharded safetensors and a probe file of the same size, fsyncs both and drops them from the page
cache (``posix_fadvise(DONTNEED)``; ``mincore`` says whether that worked), and measures the disk's
sequential read rate on the probe (16 MiB reads). Then a fresh process (this file, ``--child``)
runs what a worker does: ``import``, ``LLM(model=dir)``, generate one token; then it drops the
cache again and times ``load_model`` alone, the rate the goal compares with the disk's, and
once more with the files in the page cache (the loader's own ceiling).

How models/safetensors_weights.py reads (noted for the report, not changed here): ``safe_open``
maps each file and ``get_tensor`` copies one tensor out of the map into a fresh CPU tensor (page
faults drive the disk reads, 4 KiB pages plus the kernel's readahead); the parameter's
``copy_`` then moves it to the GPU from pageable memory, synchronously. Disk reads, the CPU copy
and the H2D copy of a tensor never overlap with each other or with the next tensor's.

    python scripts/gpu_bench_coldstart.py --child DIR --device cuda --dtype bfloat16   # the child
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from gpu_bench_common import Sizes, llama_config, sync

CHUNK = 16 << 20  # bytes per read() of the disk probe
SPAWNED_AT = "TANDEM_BENCH_SPAWNED_AT"


def run_coldstart(sizes: Sizes, device: torch.device, dtype: torch.dtype, workdir: str | None,
                  emit: Callable[[dict], None], keep: bool = False) -> None:
    root = Path(tempfile.mkdtemp(prefix="tandem-coldstart-", dir=workdir))
    try:
        model_dir = root / "model"
        started = time.perf_counter()
        weight_bytes = write_checkpoint(model_dir, sizes, dtype, device)
        probe = root / "probe.bin"
        write_probe(probe, weight_bytes)
        write_s = time.perf_counter() - started
        shards = sorted(model_dir.glob("*.safetensors"))
        dropped = all(drop_page_cache(p) for p in [*shards, probe])
        disk = {"probe_resident_before": resident_fraction(probe), "cold_gbps": round(read_rate(probe) / 1e9, 3),
                "warm_gbps": round(read_rate(probe) / 1e9, 3)}  # the second read: from the page cache
        record = {"phase": "coldstart", "workdir": str(root), "fs": filesystem_of(root), "layers": sizes.coldstart_layers,
                  "num_shards": len(shards), "weight_bytes": weight_bytes, "write_s": round(write_s, 2),
                  "fadvise_ok": dropped, "disk": disk,
                  "shards_resident_before": resident_fraction_all(shards)}
        record.update(run_child(model_dir, device, dtype))
        if "load_cold_s" in record and disk["cold_gbps"]:
            gbps = weight_bytes / record["load_cold_s"] / 1e9
            record.update(load_cold_gbps=round(gbps, 3), pct_of_disk=round(100 * gbps / disk["cold_gbps"], 1),
                          goal_70pct_met=gbps >= 0.7 * disk["cold_gbps"])
            resident = record.get("shards_resident_before_cold_load")
            record["honest_cold"] = bool(record.get("fadvise_ok_again") and resident is not None and resident < 0.05)
        if "load_warm_s" in record:
            record["load_warm_gbps"] = round(weight_bytes / record["load_warm_s"] / 1e9, 3)
        emit(record)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def write_checkpoint(directory: Path, sizes: Sizes, dtype: torch.dtype, device: torch.device) -> int:
    """A random Llama as sharded safetensors (HF names, an index, config.json); returns tensor bytes.
    Values are drawn on ``device`` (fast), then saved from the CPU."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(sizes, layers=sizes.coldstart_layers, vocab=sizes.coldstart_vocab)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    itemsize = torch.finfo(dtype).bits // 8
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > sizes.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True)
    weight_map, total = {}, 0
    for index, names in enumerate(groups, 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            t = torch.ones(shape, dtype=dtype, device=device) if len(shape) == 1 else torch.randn(shape, dtype=dtype, device=device) * 0.02
            tensors[name] = t.cpu()
            weight_map[name] = file
            total += tensors[name].numel() * itemsize
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(str(directory))
    return total


def write_probe(path: Path, num_bytes: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for offset in range(0, num_bytes, CHUNK):
            f.write(block[: min(CHUNK, num_bytes - offset)])


def drop_page_cache(path: Path) -> bool:
    """fsync, then ask the kernel to drop the file's cached pages; False where that call fails."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (mincore over a shared mapping); None if unknown."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                if libc.mincore(addr, size, vec) != 0:
                    return None
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident = sum(1 for b in vec.raw if b & 1)
        return round(resident / pages, 4)
    except (OSError, AttributeError):
        return None


def resident_fraction_all(paths: list[Path]) -> float | None:
    sizes = [os.path.getsize(p) for p in paths]
    fractions = [resident_fraction(p) for p in paths]
    if any(f is None for f in fractions) or not sum(sizes):
        return None
    return round(sum(f * s for f, s in zip(fractions, sizes)) / sum(sizes), 4)


def read_rate(path: Path) -> float:
    """Bytes per second of one sequential pass over the file in CHUNK-sized reads."""
    buffer = memoryview(bytearray(CHUNK))
    total = 0
    with open(path, "rb", buffering=0) as f:
        started = time.perf_counter()
        while n := f.readinto(buffer):
            total += n
        return total / (time.perf_counter() - started)


def filesystem_of(path: Path) -> str | None:
    """``fstype device`` of the mount holding ``path`` (from /proc/mounts)."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]), default=None)
    return f"{best[2]} {best[0]}" if best else None


def run_child(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """This file as a fresh process (a new worker); its last stdout line is its JSON."""
    env = {**os.environ, SPAWNED_AT: repr(time.time())}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(model_dir), "--device", str(device),
               "--dtype", str(dtype).removeprefix("torch.")]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"cold-start process exited {done.returncode}: {lines[-1] if lines else ''} (its stderr is above)"}
    return json.loads(lines[-1])


def child_main(model_dir: Path, device_name: str, dtype_name: str) -> dict:
    spawned_at = float(os.environ.get(SPAWNED_AT, time.time()))
    from tandem.models.loader import load_model
    from tandem.workers import LLM, SamplingParams

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    shards = sorted(model_dir.glob("*.safetensors"))
    result = {"imported_s": round(time.time() - spawned_at, 3)}  # interpreter start + torch + tandem imports
    started = time.time()
    llm = LLM(model=str(model_dir), device=device_name, dtype=dtype_name, show_progress=False)
    sync(device)
    result["llm_init_s"] = round(time.time() - started, 3)
    out = llm.generate([list(range(1, 17))], SamplingParams(max_tokens=1, ignore_eos=True))
    sync(device)
    result["first_token_s"] = round(time.time() - started - result["llm_init_s"], 3)
    result["spawn_to_first_token_s"] = round(time.time() - spawned_at, 3)
    result["first_token_ok"] = len(out[0].token_ids) == 1
    backend = getattr(getattr(getattr(llm.engine, "runner", None), "backend", None), "kind", None)
    result["backend"] = getattr(backend, "value", None)
    del llm, out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for label in ("cold", "warm"):
        if label == "cold":
            result["fadvise_ok_again"] = all(drop_page_cache(p) for p in shards)
        result[f"shards_resident_before_{label}_load"] = resident_fraction_all(shards)
        sync(device)
        started = time.perf_counter()
        loaded = load_model(model_dir, dtype=dtype, device=device, show_progress=False)
        sync(device)
        result[f"load_{label}_s"] = round(time.perf_counter() - started, 3)
        del loaded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=Path, required=True, help="checkpoint directory to start a worker on")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(json.dumps(child_main(args.child, args.device, args.dtype)), flush=True)
