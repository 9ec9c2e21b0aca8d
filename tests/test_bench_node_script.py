"""scripts/bench_node.py without a server: configuration names, the serve.yaml each becomes, the
/metrics deltas, the simulator's trace and the summary table. (The script itself runs end to end
on the CPU with `--shape tiny --device cpu`; that takes a minute or more, so it is not a test.)"""
from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tandem.orchestrator.serve_config import load_serve_config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def scripts() -> SimpleNamespace:
    sys.path.insert(0, str(SCRIPTS))
    try:
        return SimpleNamespace(**{name: importlib.import_module(name)
                                  for name in ("bench_node", "bench_node_setup", "bench_node_predict")})
    finally:
        sys.path.remove(str(SCRIPTS))


def test_config_names(scripts: SimpleNamespace) -> None:
    parse, Pool = scripts.bench_node_setup.parse_config_name, scripts.bench_node_setup.Pool
    agg = parse("agg:2xtp1")
    assert (agg.mode, agg.pools, agg.gpus) == ("aggregated", (Pool("aggregated", 2, 1),), 2)
    disagg = parse("disagg:2xtp2+1xtp4")
    assert (disagg.mode, disagg.pools, disagg.gpus) == ("disaggregated", (Pool("context", 2, 2), Pool("generation", 1, 4)), 8)
    assert parse("agg:1xtp8").gpus == 8
    for bad, why in (("agg:1xtp1+1xtp1", "agg takes one pool"), ("disagg:1xtp1", "disagg two"),
                     ("disagg:0xtp1+1xtp1", "at least 1"), ("aggregated:2", "expected agg:NxtpT")):
        with pytest.raises(ValueError, match=why):
            parse(bad)


def test_bad_config_name_is_a_usage_error(scripts: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        scripts.bench_node.parse_args(["--configs", "agg:2xtp"])
    assert "expected agg:NxtpT" in capsys.readouterr().err


@pytest.mark.parametrize("device, dtype", [("cuda", "bfloat16"), ("cpu", "float32")])
def test_serve_yaml_of_a_disaggregated_config(scripts: SimpleNamespace, tmp_path: Path, device: str, dtype: str) -> None:
    setup = scripts.bench_node_setup
    node = setup.parse_config_name("disagg:2xtp2+1xtp4")
    config = setup.serve_config(node, tmp_path / "random-llama", device=device, port=8123, kv_cache_bytes=1 << 30)
    loaded = load_serve_config(setup.write_serve_yaml(config, tmp_path / "serve.yaml"))  # the schema tandem serve reads
    assert loaded.model == f"random:{tmp_path / 'random-llama'}" and loaded.served_model_name == "random-llama"
    assert loaded.mode == "disaggregated" and set(loaded.active_pools()) == {"context", "generation"}
    context, generation = loaded.pools.context, loaded.pools.generation
    assert (context.count, context.tp_size, generation.count, generation.tp_size) == (2, 2, 1, 4)
    assert {context.device, generation.device} == {device} and {context.dtype, generation.dtype} == {dtype}
    assert context.kv_cache_bytes == 1 << 30 and loaded.pools.aggregated.count == 0
    assert (loaded.router.policy, loaded.router.local_prefill_max_tokens) == ("kv_aware", 0)  # every request hands off
    assert loaded.server.port == 8123


def test_serve_yaml_of_an_aggregated_config(scripts: SimpleNamespace, tmp_path: Path) -> None:
    setup = scripts.bench_node_setup
    config = setup.serve_config(setup.parse_config_name("agg:2xtp4"), tmp_path / "m", device="cuda", port=9000)
    loaded = load_serve_config(setup.write_serve_yaml(config, tmp_path / "serve.yaml"))
    assert loaded.mode == "aggregated" and list(loaded.active_pools()) == ["aggregated"]
    assert (loaded.pools.aggregated.count, loaded.pools.aggregated.tp_size) == (2, 4)
    assert loaded.pools.aggregated.kv_cache_bytes is None  # the worker's default
    assert loaded.pools.context.count == loaded.pools.generation.count == 0
    assert "kv_cache_bytes" not in yaml.safe_load((tmp_path / "serve.yaml").read_text())["pools"]["aggregated"]


def test_kv_delta_from_metrics(scripts: SimpleNamespace) -> None:
    before = {"tandem_kv_transfer_bytes_total": 1e9, "tandem_kv_transfer_seconds_sum": 1.0,
              "tandem_kv_transfer_seconds_count": 10, "tandem_routes_total{reason=disaggregated}": 10}
    after = {"tandem_kv_transfer_bytes_total": 5e9, "tandem_kv_transfer_seconds_sum": 3.0,
             "tandem_kv_transfer_seconds_count": 30, "tandem_routes_total{reason=disaggregated}": 30,
             "tandem_routes_total{reason=local_prefill}": 0}
    delta = scripts.bench_node.kv_delta(before, after)
    assert (delta["bytes"], delta["transfers"], delta["seconds"]) == (4_000_000_000, 20, 2.0)
    assert delta["gb_s"] == pytest.approx(2.0) and delta["mean_ms"] == pytest.approx(100.0)
    assert delta["routes"] == {"disaggregated": 20}
    assert scripts.bench_node.kv_delta({}, {})["gb_s"] is None  # aggregated: no hand-off


def test_trace_has_the_arrivals_tandem_bench_draws(scripts: SimpleNamespace) -> None:
    trace = scripts.bench_node_predict.poisson_trace(4, 2.0, 7, [10, 11, 12, 13], 5)
    rng = random.Random(7)  # orchestrator/bench.py _poisson: no wait before the first request
    expected, t = [0.0], 0.0
    for _ in range(3):
        t += rng.expovariate(2.0)
        expected.append(t)
    assert [r.arrival_s for r in trace] == expected
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(10, 5), (11, 5), (12, 5), (13, 5)]


def test_summary_table_rows(scripts: SimpleNamespace) -> None:
    node = scripts.bench_node_setup.parse_config_name("disagg:1xtp1+1xtp1")
    stats = {"mean": 1.0, "p50": 10.0, "p90": 20.0, "p99": 30.0}
    report = {"requests_ok": 5, "requests_failed": 1, "duration_s": 2.0, "ttft_ms": stats, "itl_ms": stats,
              "e2e_ms": stats, "output_tokens": 80, "output_token_throughput": 40.0, "request_throughput": 2.5,
              "goodput": 2.0, "errors": {"HTTP 500": 1}}
    kv = scripts.bench_node.kv_delta({}, {"tandem_kv_transfer_bytes_total": 2e9, "tandem_kv_transfer_seconds_sum": 1.0,
                                          "tandem_kv_transfer_seconds_count": 5})
    line = scripts.bench_node.record(node, 1.5, report, kv, [16, 16, 17], scripts.bench_node.Slo(100.0, 20.0))
    assert line["output_tokens_per_s_per_gpu"] == 20.0 and line["ttft_ms"] == {"p50": 10.0, "p90": 20.0, "p99": 30.0}
    assert line["prompt_tokens"] == {"mean": pytest.approx(49 / 3), "min": 16, "max": 17}
    table = scripts.bench_node.summary_table([line, {"config": "agg:8xtp1", "gpus": 8, "skipped": "skipped: needs 8 GPUs"}])
    rows = table.splitlines()
    assert len(rows) == 3 and "10/20/30" in rows[1] and "2.00" in rows[1] and "needs 8 GPUs" in rows[2]
