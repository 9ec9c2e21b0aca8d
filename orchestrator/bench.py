"""`tandem bench`: a load generator for any OpenAI-compatible endpoint.

Owns the workload (synthetic or JSONL prompts), the arrivals (a closed loop of C requests in
flight, or Poisson arrivals at R requests/s), the timing of one streamed request, and the report;
the statistics are pure functions. A run: resolve the model (GET /models unless given) -> send
`num_requests` streamed requests, each bounded by `timeout_s` -> `BenchResult` -> table, JSON, plot.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from tandem.orchestrator.bench_stats import RequestRecord, Slo, summarize_run
from tandem.orchestrator.jsonl import read_jsonl

Json = dict[str, Any]
WORDS = ("time", "people", "year", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
         "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week")


class BenchError(Exception):
    """A bad configuration, prompt file or model list: the run cannot start."""


class Endpoint(Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class Load:
    """How requests arrive: `concurrency` in flight (closed loop) or Poisson at `rate` per second."""

    num_requests: int = 100
    concurrency: int | None = None
    rate: float | None = None
    seed: int = 0  # the arrival times and the synthetic prompts


@dataclass(frozen=True, slots=True)
class Workload:
    """Synthetic prompts of about `prompt_tokens` words, `output_tokens` each (sent with ignore_eos),
    or the prompts of a JSONL file, cycled (a line's `max_tokens`, else `output_tokens`)."""

    prompt_tokens: int = 128
    output_tokens: int = 128
    prompts_file: str | None = None


@dataclass(frozen=True, slots=True)
class BenchConfig:
    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None: the first of GET /models
    api_key: str | None = None
    endpoint: Endpoint = Endpoint.COMPLETIONS
    load: Load = Load(concurrency=1)
    workload: Workload = Workload()
    slo: Slo = Slo()
    timeout_s: float = 300.0  # per request, connection to last byte

    def __post_init__(self) -> None:
        load, work = self.load, self.workload
        if (load.concurrency is None) == (load.rate is None):
            raise BenchError("give exactly one of concurrency and rate")
        counts = (load.num_requests, 1 if load.concurrency is None else load.concurrency, work.prompt_tokens,
                  work.output_tokens)
        if min(counts) < 1 or not (load.rate is None or load.rate > 0) or not self.timeout_s > 0:
            raise BenchError("num_requests, concurrency, prompt_tokens, output_tokens, rate and timeout "
                             "must be positive")

    def to_json(self) -> Json:
        return {**asdict(self), "endpoint": self.endpoint.value, "api_key": "***" if self.api_key else None}


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    max_tokens: int
    ignore_eos: bool


def synthetic_prompts(num: int, prompt_tokens: int, output_tokens: int, seed: int) -> list[Prompt]:
    """`num` prompts of `prompt_tokens` random common words (about a token each): distinct, so a
    prefix cache does not turn the run into a cache benchmark."""
    rng = random.Random(seed)
    return [Prompt(" ".join(rng.choices(WORDS, k=prompt_tokens)), output_tokens, True) for _ in range(num)]


def load_prompts(path: str | Path, default_max_tokens: int) -> list[Prompt]:
    """One JSON object a line: "prompt" (a string) and optional "max_tokens"; blank lines are skipped."""
    prompts = []
    for where, obj in read_jsonl(path, BenchError):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise BenchError(f'{where}: expected an object with a non-empty string "prompt"')
        max_tokens = obj.get("max_tokens", default_max_tokens)
        if type(max_tokens) is not int or max_tokens < 1:
            raise BenchError(f'{where}: "max_tokens" must be a positive integer')
        prompts.append(Prompt(obj["prompt"], max_tokens, False))
    if not prompts:
        raise BenchError(f"{path}: no prompts")
    return prompts


def endpoint_path(endpoint: Endpoint) -> str:
    return "/chat/completions" if endpoint is Endpoint.CHAT else "/completions"


def request_body(endpoint: Endpoint, model: str, prompt: Prompt) -> Json:
    body: Json = {"model": model, "max_tokens": prompt.max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}}
    if prompt.ignore_eos:
        body["ignore_eos"] = True  # an extension (vLLM, SGLang, Tandem): exactly max_tokens
    if endpoint is Endpoint.CHAT:
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


@dataclass(frozen=True, slots=True)
class BenchResult:
    config: BenchConfig
    model: str
    records: tuple[RequestRecord, ...]
    duration_s: float

    def report(self) -> Json:
        return {"model": self.model, **summarize_run(self.records, self.duration_s, self.config.slo)}

    def to_json(self) -> Json:
        return {"config": self.config.to_json(), "report": self.report(), "requests": [asdict(r) for r in self.records]}


Send = Callable[[Json], Awaitable[RequestRecord]]


class _RequestFailed(Exception):
    pass


def _chunk_text(event: Json) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    return choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""


async def _stream(client: httpx.AsyncClient, path: str, body: Json) -> tuple[list[float], int | None]:
    """POST one streamed request: the clock at each chunk that carries text, and the usage's
    completion_tokens (None without a usage chunk)."""
    times: list[float] = []
    tokens = None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise _RequestFailed(f"HTTP {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                raise _RequestFailed(f"not a JSON object: {data[:200]}")
            if "error" in event:
                raise _RequestFailed(f"error event: {json.dumps(event['error'])[:500]}")
            if _chunk_text(event):
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    return times, tokens


async def _request(client: httpx.AsyncClient, config: BenchConfig, body: Json, run_start: float) -> RequestRecord:
    path = endpoint_path(config.endpoint)
    start = time.perf_counter()
    try:
        times, tokens = await asyncio.wait_for(_stream(client, path, body), config.timeout_s)
    except asyncio.TimeoutError:
        return RequestRecord(start - run_start, False, error=f"timed out after {config.timeout_s:g} s")
    except (httpx.HTTPError, _RequestFailed, ValueError) as e:
        error = str(e) if isinstance(e, _RequestFailed) else f"{type(e).__name__}: {e}"
        return RequestRecord(start - run_start, False, error=error)
    if not times:
        return RequestRecord(start - run_start, False, error="the stream carried no text")
    gaps = tuple(b - a for a, b in zip(times, times[1:]))
    return RequestRecord(start - run_start, True, times[0] - start, gaps, time.perf_counter() - start,
                         tokens if tokens is not None else len(times))


async def _closed_loop(bodies: list[Json], concurrency: int, send: Send) -> list[RequestRecord]:
    records: list[RequestRecord | None] = [None] * len(bodies)
    indices = iter(range(len(bodies)))  # shared: each client takes the next request when it is free

    async def client() -> None:
        for i in indices:
            records[i] = await send(bodies[i])

    await asyncio.gather(*(client() for _ in range(min(concurrency, len(bodies)))))
    return records  # type: ignore[return-value]  (all filled)


def poisson_gaps(num_requests: int, rate: float, seed: int) -> list[float]:
    """Seconds before each request of an open-loop run: none before the first, then exponential
    gaps from random.Random(seed); a simulation of the same run (scripts/bench_node_predict.py)
    replays exactly these."""
    rng = random.Random(seed)
    return [0.0 if i == 0 else rng.expovariate(rate) for i in range(num_requests)]


async def _poisson(bodies: list[Json], rate: float, seed: int, send: Send) -> list[RequestRecord]:
    tasks: list[asyncio.Task] = []
    try:
        for body, gap in zip(bodies, poisson_gaps(len(bodies), rate, seed)):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send(body)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # only matters when cancelled (Ctrl-C)
            task.cancel()


async def first_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
        url = str(client.base_url).rstrip("/")
        raise BenchError(f"cannot read the model from {url}/models ({type(e).__name__}: {e}); pass --model") from e


def _prompts(config: BenchConfig) -> list[Prompt]:
    n, work = config.load.num_requests, config.workload
    if work.prompts_file is None:
        return synthetic_prompts(n, work.prompt_tokens, work.output_tokens, config.load.seed)
    prompts = load_prompts(work.prompts_file, work.output_tokens)
    return [prompts[i % len(prompts)] for i in range(n)]


async def run_bench(config: BenchConfig) -> BenchResult:
    """Send the run's requests and time them; raises BenchError before the first request only."""
    prompts = _prompts(config)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=config.load.concurrency or 100)
    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s)) as client:
        model = config.model or await first_model(client)
        bodies = [request_body(config.endpoint, model, p) for p in prompts]
        run_start = time.perf_counter()
        send = functools.partial(_request, client, config, run_start=run_start)
        if config.load.concurrency is not None:
            records = await _closed_loop(bodies, config.load.concurrency, send)
        else:
            assert config.load.rate is not None
            records = await _poisson(bodies, config.load.rate, config.load.seed, send)
        duration = time.perf_counter() - run_start
    return BenchResult(config, model, tuple(records), duration)


def format_report(result: BenchResult) -> str:
    config, report = result.config, result.report()
    load, work = config.load, config.workload
    arrivals = f"concurrency {load.concurrency}" if load.concurrency is not None else f"Poisson {load.rate:g} req/s"
    prompts = work.prompts_file or f"~{work.prompt_tokens} -> {work.output_tokens} tokens"
    lines = [
        f"tandem bench: {config.url.rstrip('/')}{endpoint_path(config.endpoint)}  model {result.model}",
        f"{'load':<26}{load.num_requests} requests, {arrivals}, prompts {prompts}",
        f"{'requests ok / failed':<26}{report['requests_ok']} / {report['requests_failed']}",
        f"{'duration':<26}{report['duration_s']:.2f} s",
        f"{'request throughput':<26}{report['request_throughput']:.2f} req/s",
        f"{'output token throughput':<26}{report['output_token_throughput']:.1f} tok/s",
    ]
    if report["goodput"] is not None:
        slo = f"TTFT <= {config.slo.ttft_ms} ms, ITL <= {config.slo.itl_ms} ms"
        lines.append(f"{'goodput':<26}{report['goodput']:.2f} req/s  ({slo})")
    lines.append(f"{'(ms)':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "itl", "e2e"):
        stats = report[f"{name}_ms"]
        cells = "".join(f"{stats[k]:>10.1f}" for k in ("mean", "p50", "p90", "p99")) if stats else f"{'-':>10}" * 4
        lines.append(f"{name.upper():<8}{cells}")
    lines += [f"error x{count}: {error}" for error, count in report["errors"].items()]
    return "\n".join(lines)


def save_json(result: BenchResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_json(), indent=2) + "\n")


def save_plot(result: BenchResult, path: str | Path) -> bool:
    """CDFs of TTFT, ITL and E2E; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in result.records if r.ok]
    series = {"TTFT": [r.ttft_s for r in ok], "ITL": [g for r in ok for g in r.itl_s], "E2E": [r.e2e_s for r in ok]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, (name, values) in zip(axes, series.items()):
        ms = sorted(v * 1000 for v in values if v is not None)
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))])
        ax.set(title=f"{name} CDF", xlabel="ms", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--url", default="http://127.0.0.1:8000/v1", help="API base URL (default: %(default)s)")
    add("--model", default=None, help="model name (default: the first of GET /models)")
    add("--api-key", default=None, help="Bearer token")
    add("--endpoint", choices=[e.value for e in Endpoint], default="completions")
    add("--num-requests", type=int, default=100)
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 1)")
    arrivals.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests/s")
    add("--seed", type=int, default=0, help="arrival times and synthetic prompts")
    add("--prompt-tokens", type=int, default=128, help="synthetic prompt length, about one token a word")
    add("--output-tokens", type=int, default=128, help="max_tokens (synthetic prompts also send ignore_eos)")
    add("--prompts", default=None, metavar="FILE.jsonl", help='lines of {"prompt": ..., "max_tokens": ...}')
    add("--slo-ttft-ms", type=float, default=None)
    add("--slo-itl-ms", type=float, default=None)
    add("--timeout", type=float, default=300.0, help="per-request timeout, s (default: %(default)s)")
    add("--json", default=None, metavar="OUT.json")
    add("--plot", default=None, metavar="OUT.png", help="CDF plot (needs matplotlib)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    concurrency = args.concurrency if args.concurrency is not None or args.rate is not None else 1
    return BenchConfig(
        url=args.url, model=args.model, api_key=args.api_key, endpoint=Endpoint(args.endpoint),
        load=Load(args.num_requests, concurrency, args.rate, args.seed),
        workload=Workload(args.prompt_tokens, args.output_tokens, args.prompts),
        slo=Slo(args.slo_ttft_ms, args.slo_itl_ms), timeout_s=args.timeout,
    )


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when some request succeeded, 1 when none did, 2 on a bad configuration, 130 on Ctrl-C."""
    try:
        result = asyncio.run(run_bench(config_from_args(args)))
    except BenchError as e:
        print(f"tandem bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tandem bench: interrupted", file=sys.stderr)
        return 130
    print(format_report(result))
    if args.json:
        save_json(result, args.json)
    if args.plot and not save_plot(result, args.plot):
        print(f"tandem bench: the plot needs matplotlib (pip install matplotlib); {args.plot} not written",
              file=sys.stderr)
    return 0 if any(r.ok for r in result.records) else 1
