"""The orchestrator's own overhead and its ceiling, over workers that produce tokens without a
model (`--model synthetic`: models/synthetic.py).

Starts one context and one generation worker process (`tandem.workers.main`, synthetic model),
and the REST app over them in a process of its own (this script with `--serve-app`: uvicorn with
the app state `tandem serve` builds, without Ray; router kv_aware with
`local_prefill_max_tokens: 0`, so every request takes the disaggregated path). Then:

- Overhead: N sequential requests after a warm-up, each run three ways in a shuffled order, each
  with a fresh prompt of the same length and the same max_tokens: a direct worker call (Prefill
  on the context worker, timed to its reply, which carries the first token; then Generate with the
  handle, as orchestrator/pipeline.py does, through orchestrator/worker_client.py), a streaming
  /v1/completions through the app on one keep-alive raw HTTP connection, and the same through one
  httpx.AsyncClient; both REST paths timed to the first SSE chunk with text. Overhead = p50(REST)
  - p50(direct).
- Ceiling: for each K, K streaming requests at once from a separate load-generator process (one
  connection each), while a thread GETs /health every 10 ms. K streams are carried without
  stalling when every stream finishes with all its tokens and the /health p99 during the load is
  under 50 ms. Reported: ITL and TTFT as the clients saw them, client tokens/s, the most streams
  open at once, and the CPU seconds each process used (all of them share the machine's cores).

Prints a JSON summary (and writes it to --out). Every process it starts is stopped at the end,
on an error and on Ctrl-C; their logs stay in the directory printed on stderr.

    python scripts/bench_orchestrator.py --out orchestrator.json
    python scripts/bench_orchestrator.py --overhead-requests 5 --warmup 1 --concurrency 20 --stream-tokens 8
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench_orchestrator_clients import (
    HealthProbe,
    SSEConnection,
    completion_body,
    cpu_seconds,
    raise_open_files_limit,
    run_load,
)
from bench_processes import Processes, run_and_report
from tandem.orchestrator.bench_stats import summarize_ms

Json = dict[str, Any]
MODEL = "synthetic"
STALL_HEALTH_P99_MS = 50.0
OVERHEAD_GOAL_P50_MS = 2.0
BLOCK_SIZE = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overhead-requests", type=int, default=200, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=20, help="requests per path before measuring")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--overhead-max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[250, 500, 1000], help="streams at once")
    parser.add_argument("--stream-tokens", type=int, default=128, help="max_tokens of each ceiling stream")
    parser.add_argument("--probe-interval-ms", type=float, default=10.0)
    parser.add_argument("--kv-cache-bytes", type=int, default=64 << 20, help="per worker (1 KiB a block)")
    parser.add_argument("--profile-app", default=None, help="cProfile the app process into this file")
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    parser.add_argument("--serve-app", default=None, help=argparse.SUPPRESS)  # internal: workers' ready lines
    parser.add_argument("--max-concurrent", type=int, default=2048, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- processes ---------------------------------------------------------------------------------


def worker_command(role: str, args: argparse.Namespace) -> list[str]:
    max_seqs = max([*args.concurrency, 64]) + 16
    return [
        sys.executable, "-m", "tandem.workers.main", "--role", role, "--port", "0", "--model", MODEL,
        "--kv-cache-bytes", str(args.kv_cache_bytes), "--block-size", str(BLOCK_SIZE),
        "--max-num-seqs", str(max_seqs), "--max-num-batched-tokens", str(max(2048, 2 * max_seqs)),
    ]


def app_command(workers_file: Path, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-app", str(workers_file),
               "--max-concurrent", str(max([*args.concurrency, 1]) + 64)]
    return command + (["--profile-app", args.profile_app] if args.profile_app else [])


def serve_app(args: argparse.Namespace) -> int:
    """The app process: the REST app over the workers named in the --serve-app file, on a free
    port, with uvicorn's defaults (uvloop, httptools) as `tandem serve` runs it."""
    import cProfile
    import socket

    import uvicorn

    from tandem.orchestrator.app import create_app
    from tandem.orchestrator.cluster import Cluster, WorkerInfo
    from tandem.orchestrator.serve import app_state
    from tandem.orchestrator.serve_config import ServeConfig

    raise_open_files_limit()
    readies = json.loads(Path(args.serve_app).read_text())
    config = ServeConfig.model_validate({
        "model": MODEL,
        "router": {"policy": "kv_aware", "local_prefill_max_tokens": 0, "max_retries": 1},
        "limits": {"max_concurrent_requests": args.max_concurrent, "request_timeout_s": 600},
    })

    async def start():
        cluster = Cluster(block_size=BLOCK_SIZE)
        for ready in readies:
            cluster.add(WorkerInfo.from_ready(ready))
        return await app_state(cluster, readies[-1]["worker_id"], config, None)

    async def stop(state) -> None:
        await state.cluster.close()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(start, stop), log_level="warning", backlog=4096))

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[listener]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            print(json.dumps({"event": "ready", "url": url}), flush=True)
        await task

    # uvicorn handles SIGTERM and SIGINT while it serves, then raises the signal again: let that
    # one pass, so that the profile below is written and the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    profiler = cProfile.Profile() if args.profile_app else None
    if profiler is not None:
        profiler.enable()
    try:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(serve())
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile_app)
    return 0


# -- overhead ----------------------------------------------------------------------------------


def text_token_run(tokenizer, vocab_size: int, length: int, first: int = 1000) -> int:
    """An id whose `length` successors each decode to ASCII text on their own: the synthetic
    model then streams one SSE chunk with text per token after a prompt ending in it."""
    run = 0
    for token in range(first, vocab_size):
        text = tokenizer.decode([token])
        run = run + 1 if text and text.isascii() else 0
        if run == length + 1:
            return token - length
    raise RuntimeError(f"no {length + 1} adjacent token ids decode to ASCII text")


def random_prompt(rng: random.Random, num_tokens: int, anchor: int) -> list[int]:
    """A fresh prompt (no prefix-cache hits) that ends in `anchor`."""
    return [rng.randrange(1000, 20000) for _ in range(num_tokens - 1)] + [anchor]


async def direct_ttft(context, generation, request_id: str, prompt: list[int], params: Json) -> float:
    """Prefill then Generate(handle), as the pipeline calls them; TTFT is the Prefill reply."""
    start = time.perf_counter()
    reply = await context.prefill(request_id, prompt, params, timeout_s=60)
    ttft = time.perf_counter() - start
    tokens = 1
    async for delta in generation.generate(request_id, prompt, params, handle=reply.handle,
                                           first_token_id=reply.first_token_id, timeout_s=60):
        tokens += len(delta.token_ids)
    if tokens != params["max_tokens"]:
        raise RuntimeError(f"direct request {request_id}: {tokens} tokens, expected {params['max_tokens']}")
    return ttft


async def raw_ttft(connection: SSEConnection, body: bytes, max_tokens: int) -> float:
    record = await connection.stream("/v1/completions", body)
    if not record.finished(max_tokens):
        raise RuntimeError(f"REST request failed: {record}")
    return record.token_times[0] - record.start


async def httpx_ttft(client, body: bytes) -> float:
    start, ttft = time.perf_counter(), None
    async with client.stream("POST", "/v1/completions", content=body,
                             headers={"Content-Type": "application/json"}) as response:
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("text"):
                    ttft = time.perf_counter() - start
    if response.status_code != 200 or ttft is None:
        raise RuntimeError(f"httpx request failed: HTTP {response.status_code}")
    return ttft


async def prepare_and_measure_overhead(args: argparse.Namespace, url: str, readies: dict[str, dict]) -> Json:
    import httpx

    from tandem.orchestrator.openai_protocol import CompletionRequest
    from tandem.orchestrator.tokenizer import PromptTokenizer
    from tandem.orchestrator.worker_client import WorkerClient

    context = WorkerClient(readies["context"]["address"])
    generation = WorkerClient(readies["generation"]["address"])
    info = await context.model_info()
    longest = max(args.overhead_max_tokens, args.stream_tokens)
    anchor = text_token_run(PromptTokenizer.from_model_info(info), info.vocab_size, longest)
    connection, rng = SSEConnection(url), random.Random(0)
    samples: dict[str, list[float]] = {"direct": [], "rest": [], "rest_httpx": []}
    max_tokens = args.overhead_max_tokens
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        served = (await client.get("/v1/models")).json()["data"][0]["id"]
        for i in range(args.warmup + args.overhead_requests):
            kinds = list(samples)
            rng.shuffle(kinds)
            for kind in kinds:
                prompt = random_prompt(rng, args.prompt_tokens, anchor)
                body = completion_body(served, prompt, max_tokens)
                if kind == "direct":
                    params = CompletionRequest.model_validate_json(body).sampling_params()  # what the app sends
                    ttft = await direct_ttft(context, generation, f"direct-{i}", prompt, params)
                else:
                    ttft = await (raw_ttft(connection, body, max_tokens) if kind == "rest" else httpx_ttft(client, body))
                if i >= args.warmup:
                    samples[kind].append(ttft)
    await connection.close()
    await context.close()
    await generation.close()
    stats = {f"{kind}_ttft_ms": summarize_ms(values) for kind, values in samples.items()}
    overhead = stats["rest_ttft_ms"]["p50"] - stats["direct_ttft_ms"]["p50"]
    return {
        "served_model": served, "model_name_from_worker": info.model, "anchor_token": anchor,
        "overhead": {
            "requests_per_path": args.overhead_requests, "prompt_tokens": args.prompt_tokens, "max_tokens": max_tokens,
            **stats,
            "overhead_p50_ms": overhead,
            "overhead_p50_httpx_ms": stats["rest_httpx_ttft_ms"]["p50"] - stats["direct_ttft_ms"]["p50"],
            "goal_p50_ms": OVERHEAD_GOAL_P50_MS,
            "goal_met": overhead < OVERHEAD_GOAL_P50_MS,
        },
    }


# -- ceiling -----------------------------------------------------------------------------------


def measure_ceiling(args: argparse.Namespace, url: str, served: str, anchor: int, pids: dict[str, int], k: int) -> Json:
    """K streams at once from a load-generator process, /health probed from a thread here."""
    rng = random.Random(k)
    bodies = [completion_body(served, random_prompt(rng, args.prompt_tokens, anchor), args.stream_tokens)
              for _ in range(k)]
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    loader = spawn.Process(target=run_load, args=(url, bodies, args.stream_tokens, results), daemon=True)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    with HealthProbe(url, args.probe_interval_ms / 1000) as probe:
        loader.start()
        summary = _wait_for(results, loader)
    loader.join(30)
    cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
    health = probe.summary(since=summary.pop("t_start"), until=summary.pop("t_end"))
    carried = summary["finished"] == k and health["ms"] is not None and health["ms"]["p99"] < STALL_HEALTH_P99_MS
    return {"concurrency": k, "max_tokens": args.stream_tokens, **summary, "health": health,
            "process_cpu_s": cpu, "carried_without_stalling": carried}


def _wait_for(results, loader) -> Json:
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not loader.is_alive():
                raise RuntimeError(f"the load generator exited with code {loader.exitcode}") from None


def idle_health(url: str, interval_s: float, seconds: float = 1.0) -> Json:
    with HealthProbe(url, interval_s) as probe:
        time.sleep(seconds)
    return probe.summary()


# -- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace, processes: Processes) -> Json:
    for role in ("context", "generation"):
        processes.launch(role, worker_command(role, args))
    readies = {role: processes.wait_ready(role) for role in ("context", "generation")}
    workers_file = processes.log_dir / "workers.json"
    workers_file.write_text(json.dumps([readies["context"], readies["generation"]]))
    processes.launch("app", app_command(workers_file, args))
    url = processes.wait_ready("app")["url"]
    result = asyncio.run(prepare_and_measure_overhead(args, url, readies))
    pids = {name: processes.pid(name) for name in ("app", "context", "generation")}
    result["health_idle"] = idle_health(url, args.probe_interval_ms / 1000)
    result["ceiling"] = [measure_ceiling(args, url, result["served_model"], result["anchor_token"], pids, k)
                         for k in args.concurrency]
    carried = [c["concurrency"] for c in result["ceiling"] if c["carried_without_stalling"]]
    result["most_streams_carried"] = max(carried, default=0)
    result["stall_criterion"] = f"every stream finished and /health p99 < {STALL_HEALTH_P99_MS:g} ms during the load"
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_app:
        return serve_app(args)
    return run_and_report(args, run, "tandem-bench-orchestrator-", "synthetic (no model compute)")


if __name__ == "__main__":
    sys.exit(main())
