"""`tandem generate` as a user runs it: a subprocess, real model, exit status and output."""
from __future__ import annotations

import subprocess
import sys


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem.orchestrator.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_prints_the_greedy_continuation() -> None:
    result = tandem("generate", "The capital of France is", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("Paris")
    assert "Loading" in result.stderr  # loading shows progress


def test_generate_with_a_bad_model_path_says_so() -> None:
    result = tandem("generate", "hi", "--model", "/no/such/model")
    assert result.returncode == 2
    assert "/no/such/model" in result.stderr and "Traceback" not in result.stderr


def test_generate_with_bad_sampling_params_says_which() -> None:
    result = tandem("generate", "hi", "--max-tokens", "0")
    assert result.returncode == 2
    assert "max_tokens" in result.stderr
