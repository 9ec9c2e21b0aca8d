"""scripts/bench_cpu_linears.py end to end on the embedded model: it measures its ceilings and
prints one row per matmul path and batch, with positive times."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tandem.kernels import cpu_grid_linear

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_cpu_linears.py"


def test_the_script_reports_every_path_against_its_ceiling() -> None:
    env = {**os.environ, "TANDEM_CPU_PACKED_MIN_ROWS": "0"}  # every weight packed: the oneDNN row is printed
    done = subprocess.run([sys.executable, str(SCRIPT), "--batches", "2", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"ceilings: fp32 matmul \d+ GFLOP/s .* read [\d.]+ GB/s", done.stdout), done.stdout
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    paths = {"grid codes", "oneDNN prepacked", "ATen", "MKL packed for this batch"}
    if cpu_grid_linear.pack_on_grid(torch.zeros(32, 32)) is None:  # no C compiler here
        paths.discard("grid codes")
    if not torch.backends.mkldnn.is_available():
        paths.discard("oneDNN prepacked")
    if not torch.backends.mkl.is_available():
        paths.discard("MKL packed for this batch")
    assert {cells[1].strip() for cells in rows} == paths
    for cells in rows:
        step_ms, cached_ms, gflops, gbs, ceiling_ms = (float(c) for c in cells[2:])
        assert step_ms > 0 and cached_ms > 0 and gflops > 0 and gbs > 0 and ceiling_ms > 0
