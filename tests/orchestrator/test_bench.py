"""`tandem bench`: percentiles against numpy, goodput, JSONL prompt loading, and one run against a
real uvicorn over SmolLM2 context and generation worker processes."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import numpy as np
import pytest

from tandem.orchestrator.bench import (
    BenchConfig, BenchError, Endpoint, Load, Workload, format_report, load_prompts, run_bench, save_json,
)
from tandem.orchestrator.bench_stats import RequestRecord, Slo, goodput, percentile, summarize_ms
from worker_rpc import Server, app_over_workers

KV_CACHE_BYTES = 96 * 737_280  # 96 blocks of 16 tokens of SmolLM2 in float32
API_KEY = "sk-bench"


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_percentile_matches_numpy(size: int) -> None:
    values = [random.Random(size).expovariate(1.0) for _ in range(size)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_interpolates_and_rejects_nothing_to_rank() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5 and percentile([4, 1, 3, 2], 90) == pytest.approx(3.7)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summaries_are_in_milliseconds() -> None:
    assert summarize_ms([]) is None
    assert summarize_ms([0.001, 0.003]) == pytest.approx({"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98})


def test_goodput_counts_successes_within_both_slos() -> None:
    records = [
        RequestRecord(0, True, ttft_s=0.1, itl_s=(0.01, 0.03)),  # TTFT 100 ms, mean ITL 20 ms
        RequestRecord(0, True, ttft_s=0.3, itl_s=(0.01,)),  # TTFT too slow for 200 ms
        RequestRecord(0, True, ttft_s=0.1, itl_s=(0.05, 0.05)),  # ITL too slow for 30 ms
        RequestRecord(0, True, ttft_s=0.1),  # one token: no gap to miss
        RequestRecord(0, False, error="HTTP 503: busy"),
    ]
    assert goodput(records, Slo(), 2.0) is None
    assert goodput(records, Slo(ttft_ms=200, itl_ms=30), 2.0) == 1.0  # 2 requests in 2 s
    assert goodput(records, Slo(ttft_ms=200), 2.0) == 1.5
    assert goodput(records, Slo(itl_ms=30), 1.0) == 3.0


def test_load_prompts_reads_lines_and_names_a_bad_one(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello", "max_tokens": 7}\n\n{"prompt": "World"}\n')
    prompts = load_prompts(path, default_max_tokens=32)
    assert [(p.text, p.max_tokens, p.ignore_eos) for p in prompts] == [("Hello", 7, False), ("World", 32, False)]
    for bad, message in [
        ('{"prompt": "ok"}\n{"prompt": "x",}\n', "line 2: not JSON"),
        ('{"prompt": "ok"}\n\n["a list"]\n', 'line 3: expected an object with a non-empty string "prompt"'),
        ('{"prompt": "ok", "max_tokens": 0}\n', 'line 1: "max_tokens" must be a positive integer'),
        ("\n", "no prompts"),
    ]:
        path.write_text(bad)
        with pytest.raises(BenchError, match=message):
            load_prompts(path, 32)
    with pytest.raises(BenchError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl", 32)


def test_config_needs_one_arrival_process_and_positive_counts() -> None:
    with pytest.raises(BenchError, match="exactly one"):
        BenchConfig("http://x/v1", load=Load(concurrency=2, rate=1.0))
    with pytest.raises(BenchError, match="positive"):
        BenchConfig("http://x/v1", load=Load(concurrency=0))


@pytest.fixture(scope="module")
def server(start_worker):
    args = ["--kv-cache-bytes", str(KV_CACHE_BYTES), "--dtype", "float32", "--device", "cpu"]
    workers = start_worker.all(start_worker.launch("context", *args), start_worker.launch("generation", *args))
    server = Server(app_over_workers(workers, API_KEY))
    yield server
    server.stop()


def test_bench_against_a_real_server(server, tmp_path) -> None:
    config = BenchConfig(f"{server.url}/v1", api_key=API_KEY, load=Load(num_requests=8, concurrency=4),
                         workload=Workload(prompt_tokens=32, output_tokens=16), slo=Slo(60_000, 60_000),
                         timeout_s=120)
    result = asyncio.run(run_bench(config))
    print("\n" + format_report(result))
    report = result.report()
    assert result.model == "smollm2"  # the first of GET /models
    assert (report["requests_ok"], report["requests_failed"], report["output_tokens"]) == (8, 0, 8 * 16)
    assert report["goodput"] == pytest.approx(report["request_throughput"]) and report["output_token_throughput"] > 0
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        stats = report[name]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] and stats["mean"] > 0, (name, stats)
    assert all(r.ttft_s < r.e2e_s and len(r.itl_s) > 0 for r in result.records)
    save_json(result, tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["report"]["output_tokens"] == 128 and len(saved["requests"]) == 8
    assert saved["config"]["load"]["concurrency"] == 4 and saved["config"]["api_key"] == "***"

    chat = asyncio.run(run_bench(dataclasses.replace(config, endpoint=Endpoint.CHAT, load=Load(2, concurrency=2))))
    assert chat.report()["output_tokens"] == 2 * 16
    wrong_key = asyncio.run(run_bench(dataclasses.replace(config, api_key="nope", model="smollm2")))
    assert [r.error[:8] for r in wrong_key.records] == ["HTTP 401"] * 8
