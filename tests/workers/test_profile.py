"""`tandem profile` on a tiny model: the JSON it writes is a WorkerProfile the planner accepts,
and its numbers come from the rows it measured."""
from __future__ import annotations

import json

from tandem.orchestrator.cli import main
from tandem.orchestrator.planner_load import WorkerProfile


def test_profile_writes_what_the_planner_reads(tiny_llama, tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    code = main(["profile", "--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32",
                 "--prompt-tokens", "32", "--output-tokens", "8", "--itl-slo-ms", "1000", "--max-batch", "4",
                 "--kv-cache-bytes", str(1 << 20), "--out", str(out)])
    assert code == 0
    profile = WorkerProfile.from_json(out.read_text())
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decode = [row for row in rows if row.get("measure") == "decode"]
    assert [row["batch"] for row in decode] == [1, 2, 4]  # every batch within a 1 s step on a tiny model
    assert profile.max_concurrent_seqs == 4
    assert profile.decode_tokens_per_s == decode[-1]["tokens_per_s"]
    assert profile.prefill_tokens_per_s == rows[0]["tokens_per_s"] > 0


def test_a_slo_no_batch_meets_is_refused(tiny_llama, tmp_path, capsys) -> None:
    code = main(["profile", "--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32",
                 "--prompt-tokens", "16", "--itl-slo-ms", "0.0001", "--max-batch", "2", "--out", str(tmp_path / "p.json")])
    assert code == 2 and "slower than the ITL SLO" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_a_colocated_profile_times_each_role_while_the_other_runs_beside_it(tiny_llama) -> None:
    from tandem.workers.config import CacheConfig
    from tandem.workers.llm import LLM
    from tandem.workers.profile import measure_profile
    from tandem.workers.profile_neighbour import Neighbour

    model = str(tiny_llama[0])
    llm = LLM(model, device="cpu", dtype="float32", show_progress=False, cache=CacheConfig(num_bytes=1 << 20))
    neighbour = Neighbour(model, "cpu", "float32", 1 << 20, num_threads=1)
    try:
        profile, _ = measure_profile(llm, prompt_tokens=32, output_tokens=8, itl_slo_ms=1000, max_batch=2,
                                     neighbour=neighbour)
    finally:
        steps = neighbour.close()
    assert profile["max_concurrent_seqs"] == 2 and profile["prefill_tokens_per_s"] > 0
    assert steps["decode"] > 0 and steps["prefill"] > 0, steps  # it decoded beside the prefills, and back
    assert not neighbour.alive
