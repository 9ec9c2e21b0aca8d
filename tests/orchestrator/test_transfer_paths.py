"""The KV hand-off path report: ok, degraded, failing by the last outcome of each live pair; a
failure ages out of the window; a worker that leaves takes its paths with it."""
from __future__ import annotations

import time

from tandem.orchestrator.transfer_paths import TransferPaths


def test_status_follows_the_last_outcome_of_each_live_pair() -> None:
    paths = TransferPaths()
    assert paths.report([], ["g0"]) == {"status": "none", "paths": {}}
    assert paths.report(["c0"], ["g0", "g1"])["status"] == "ok"  # untested pairs are not failures
    paths.record("c0", "g0", False, "UNAVAILABLE: peer died")
    report = paths.report(["c0"], ["g0", "g1"])
    assert report["status"] == "degraded"
    assert report["paths"]["c0->g0"]["ok"] is False and report["paths"]["c0->g0"]["detail"] == "UNAVAILABLE: peer died"
    paths.record("c0", "g1", False, "FAILED_PRECONDITION: block_size 8 != 4")
    assert paths.report(["c0"], ["g0", "g1"])["status"] == "failing"
    paths.record("c0", "g1", True, "1024 B in 0.3 ms")
    assert paths.report(["c0"], ["g0", "g1"])["status"] == "degraded"
    assert paths.report(["c0"], ["g1"])["status"] == "ok"  # g0 is no longer live: not reported


def test_a_failure_ages_out_and_a_leaving_worker_forgets_its_paths() -> None:
    paths = TransferPaths(failure_window_s=0.05)
    paths.record("c0", "g0", False, "DEADLINE_EXCEEDED")
    assert paths.report(["c0"], ["g0"])["status"] == "failing"
    time.sleep(0.06)
    assert paths.report(["c0"], ["g0"])["status"] == "ok"
    assert "c0->g0" in paths.report(["c0"], ["g0"])["paths"]  # still shown, no longer counted
    paths.forget("g0")
    assert paths.report(["c0"], ["g0"])["paths"] == {}
