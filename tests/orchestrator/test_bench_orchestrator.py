"""scripts/bench_orchestrator.py in a tiny configuration: two synthetic workers, the app, a few
overhead requests and 20 streams at once; its JSON has every field and every request finished."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_orchestrator.py"


def test_tiny_run_reports_every_field(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    command = [sys.executable, str(SCRIPT), "--overhead-requests", "5", "--warmup", "1", "--concurrency", "20",
               "--stream-tokens", "8", "--overhead-max-tokens", "4", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["model"] == "synthetic (no model compute)"
    assert summary["served_model"] == summary["model_name_from_worker"] == "synthetic"
    overhead = summary["overhead"]
    for path in ("direct", "rest", "rest_httpx"):
        assert set(overhead[f"{path}_ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert {"overhead_p50_ms", "overhead_p50_httpx_ms", "goal_met"} <= set(overhead)
    (ceiling,) = summary["ceiling"]
    assert ceiling["concurrency"] == ceiling["streams"] == ceiling["finished"] == 20, ceiling["errors"]
    assert ceiling["tokens"] == 20 * 8 and ceiling["tokens_per_s"] > 0
    assert ceiling["itl_ms"]["p99"] >= ceiling["itl_ms"]["p50"] > 0
    assert ceiling["health"]["probes"] >= 0 and set(ceiling["process_cpu_s"]) == {"app", "context", "generation"}
    assert isinstance(ceiling["carried_without_stalling"], bool)
    assert summary["most_streams_carried"] in (0, 20)
