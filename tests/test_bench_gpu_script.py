"""scripts/bench_gpu.py --smoke on the CPU: every phase runs end to end in a subprocess and prints
its JSON lines with the fields the GPU run is read by."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def test_smoke_run_on_cpu_reports_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    command = [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--workdir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == records
    assert not [r for r in records if "error" in r]
    assert all(r["device"] == "cpu" for r in records)
    by_phase: dict[str, list[dict]] = {}
    for r in records:
        by_phase.setdefault(r["phase"], []).append(r)
    assert list(by_phase) == ["env", "bandwidth", "decode", "hf", "prefill", "offline", "coldstart", "done"]

    (bandwidth,) = by_phase["bandwidth"]
    assert {"sum_gbps", "max_gbps", "copy_gbps", "read_gbps"} <= set(bandwidth)
    decode = by_phase["decode"]
    assert {r["batch"] for r in decode} == {1, 2}
    for r in decode:
        assert {"enforce_eager", "backend", "weight_read_bytes", "kv_read_bytes", "bytes_per_step", "roofline_ms",
                "pct_of_roofline", "prefill_s", "mean_context_tokens", "tok_s"} <= set(r)
        assert r["step"]["median_ms"] > 0 and r["step"]["p90_ms"] >= r["step"]["median_ms"]
        assert r["runner_execute"]["median_ms"] > 0
        assert r["bytes_per_step"] == r["weight_read_bytes"] + r["kv_read_bytes"]
    hf = by_phase["hf"]
    assert {(r["cache"], r["batch"]) for r in hf} == {("dynamic", 1), ("dynamic", 2), ("static", 1), ("static", 2)}
    assert all("step_ms" in r and "pct_of_roofline" in r for r in hf)  # (full - first) / (n - 1): noise on a busy CPU
    (prefill,) = by_phase["prefill"]
    assert {"prompt_len", "steps", "step_ms", "flops", "non_embedding_params", "attention_flops", "achieved_tflops",
            "peak_tflops", "matmul_ms", "pct_of_peak", "backend"} <= set(prefill)
    assert prefill["prompt_len"] == 64 and prefill["steps"] == 1 and prefill["step_ms"] > 0 and prefill["flops"] > 0
    offline = {r.get("variant", r["engine"]): r for r in by_phase["offline"]}
    assert set(offline) == {"tandem", "generate_dynamic", "generate_static", "generate_batch", "summary"}
    for name in ("tandem", "generate_dynamic", "generate_static", "generate_batch"):
        assert offline[name]["output_tokens"] == 8 * 8 and offline[name]["tok_s"] > 0, offline[name]
    assert offline["summary"]["ratio_to_best_hf"] > 0 and offline["summary"]["best_hf"] in offline
    (cold,) = by_phase["coldstart"]
    assert {"disk", "fadvise_ok", "weight_bytes", "llm_init_s", "first_token_s", "spawn_to_first_token_s",
            "load_cold_s", "load_cold_gbps", "pct_of_disk", "load_warm_gbps", "honest_cold"} <= set(cold)
    assert cold["first_token_ok"] and cold["disk"]["cold_gbps"] > 0
    assert by_phase["done"][0]["errors"] == 0
    assert not list(tmp_path.glob("tandem-coldstart-*"))  # the checkpoint was removed
