"""GPU benchmarks of the issue "The GPU path": decode against the memory roofline, transformers at
the same shape, and cold start from local safetensors. One JSON line per measurement on stdout
(logs go to stderr); a phase that fails prints a line with "error" and the next phase runs.

    python scripts/bench_gpu.py --out gpu.jsonl                 # all phases, default sizes
    python scripts/bench_gpu.py --only decode --batches 1,8     # one phase, fewer batches
    python scripts/bench_gpu.py --smoke --device cpu            # tiny sizes, end to end on a CPU

Phases, in this order, with what each took at default sizes on one H200 (2026-11-26, engine
without CUDA graphs yet, Triton attention, no FlashInfer; 75 s in all, 6 minutes is the budget):
- bandwidth (with decode or hf, <1 s): sum and max over 4 GiB of bfloat16 (read), and a copy.
- decode (24 s per engine variant): Llama-3.1-8B-shaped random bf16 model built by Tandem's model
  class on the GPU; one engine per variant (eager; CUDA graphs; CUDA graphs with the overlapped
  step), batches 1/8/32/128 of 1024-token prompts; prefill, 3 warm-up then 32 timed decode
  steps each (each synchronized), then 32 back to back (the cadence, where overlap shows). Add graph capture, and a FlashInfer JIT (tens of seconds on a fresh machine) if
  FlashInfer is installed.
- hf (22 s): transformers LlamaForCausalLM at the same shape, batches 1/8, 64 new tokens,
  dynamic then static cache (static is not torch.compiled unless --hf-compile, which adds minutes).
- prefill (not yet run on a GPU; ~15 s expected): the decode phase's model, one 4096-token prompt
  prefilled in one engine step (median of 3, fresh random prompts), its FLOPs against the bf16
  torch.mm peak (8192^3) measured in the same run; goal 60% of that peak.
- offline (not yet run on a GPU; ~90 s expected): 256 random requests of 512 + 256 tokens, EOS
  ignored, through Tandem's engine (CUDA graphs on) to completion; then transformers over the first
  128 (--offline-hf-requests): generate at batch 64 with the dynamic and the static cache, and
  generate_batch (continuous batching). Output tokens/s each, and Tandem's ratio to the best (goal 5x).
- coldstart (30 s): writes an 8-layer random Llama (4.0 GB) and a probe file of the same size,
  drops both from the page cache, then a fresh process goes from spawn to its first token.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import logging
import platform
import sys
import time
import traceback

import torch
from gpu_bench_common import SMOKE, Sizes, memory_bandwidth

PHASES = ("decode", "hf", "prefill", "offline", "coldstart")


class Report:
    """Prints each record as one JSON line and keeps them for --out."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[dict] = []
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    def emit(self, record: dict) -> None:
        record = {**record, "device": self.device.type, "device_name": self.device_name, "time": round(time.time(), 1)}
        self.records.append(record)
        print(json.dumps(record), flush=True)

    @property
    def num_errors(self) -> int:
        return sum("error" in r for r in self.records)


def environment(sizes: Sizes, device: torch.device) -> dict:
    versions = {}
    for package in ("torch", "transformers", "triton", "flashinfer-python", "safetensors", "tandem-serve"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    record = {"phase": "env", "versions": versions, "cuda": torch.version.cuda, "python": platform.python_version(),
              "sizes": dataclasses.asdict(sizes)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                      capability=f"{props.major}.{props.minor}")
    else:
        record["note"] = "CPU run: every number below is from the CPU, none is a GPU figure"
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (2 layers, hidden 256, batches 1,2, 64-token prompts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--batches", type=ints, default=None, help="decode batch sizes, e.g. 1,8,32,128")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per batch")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the decode/hf model")
    parser.add_argument("--hf-batches", type=ints, default=None)
    parser.add_argument("--hf-new-tokens", type=int, default=None)
    parser.add_argument("--hf-compile", action="store_true", help="let transformers torch.compile the static-cache run")
    parser.add_argument("--prefill-len", type=int, default=None, help="tokens of the prefill phase's one prompt")
    parser.add_argument("--offline-requests", type=int, default=None)
    parser.add_argument("--offline-prompt-len", type=int, default=None)
    parser.add_argument("--offline-output-len", type=int, default=None)
    parser.add_argument("--offline-hf-requests", type=int, default=None, help="the first N offline requests run through transformers")
    parser.add_argument("--coldstart-layers", type=int, default=None)
    parser.add_argument("--bandwidth-mib", type=int, default=None, help="size of the bandwidth probe tensor")
    parser.add_argument("--workdir", default=None, help="where the cold-start checkpoint is written (default: /tmp)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--out", default=None, help="also write every JSON line to this file")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"--only: unknown phase(s) {sorted(unknown)}; choose from {PHASES}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    overrides = {
        "batches": args.batches, "prompt_len": args.prompt_len, "decode_steps": args.decode_steps, "layers": args.layers,
        "hf_batches": args.hf_batches, "hf_new_tokens": args.hf_new_tokens, "coldstart_layers": args.coldstart_layers,
        "bandwidth_bytes": args.bandwidth_mib and args.bandwidth_mib << 20, "prefill_len": args.prefill_len,
        "offline_requests": args.offline_requests, "offline_prompt_len": args.offline_prompt_len,
        "offline_output_len": args.offline_output_len, "offline_hf_requests": args.offline_hf_requests,
    }
    return dataclasses.replace(SMOKE if args.smoke else Sizes(), **{k: v for k, v in overrides.items() if v})


def run_phase(report: Report, phase: str, fn) -> object:
    """Run one phase; an exception becomes an "error" line. Returns fn's result or None."""
    started = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every phase gets its chance
        report.emit({"phase": phase, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
        return None
    finally:
        gc.collect()
        if report.device.type == "cuda":
            torch.cuda.empty_cache()
        logging.getLogger("bench_gpu").info("phase %s took %.1f s", phase, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = sizes_from(args)
    phases = [p for p in PHASES if p in args.only.split(",")]
    report = Report(device)
    report.emit(environment(sizes, device))
    started = time.perf_counter()

    bandwidth = None
    if {"decode", "hf"} & set(phases):
        bandwidth = run_phase(report, "bandwidth", lambda: memory_bandwidth(device, sizes.bandwidth_bytes))
        if bandwidth is not None:
            report.emit({"phase": "bandwidth", **bandwidth})
    if "decode" in phases or "hf" in phases:
        from gpu_bench_decode import run_hf_decode, run_tandem_decode  # imports tandem's engine

        if "decode" in phases:
            run_phase(report, "decode", lambda: run_tandem_decode(sizes, device, dtype, bandwidth, report.emit))
        if "hf" in phases:
            run_phase(report, "hf", lambda: run_hf_decode(sizes, device, dtype, bandwidth, report.emit, args.hf_compile))
    if "prefill" in phases or "offline" in phases:
        from gpu_bench_offline import run_offline, run_prefill

        if "prefill" in phases:
            run_phase(report, "prefill", lambda: run_prefill(sizes, device, dtype, report.emit))
        if "offline" in phases:
            run_phase(report, "offline", lambda: run_offline(sizes, device, dtype, report.emit))
    if "coldstart" in phases:
        from gpu_bench_coldstart import run_coldstart

        run_phase(report, "coldstart", lambda: run_coldstart(sizes, device, dtype, args.workdir, report.emit, args.keep_workdir))

    report.emit({"phase": "done", "seconds": round(time.perf_counter() - started, 1), "errors": report.num_errors})
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in report.records)
    return 1 if report.num_errors else 0


if __name__ == "__main__":
    sys.exit(main())
