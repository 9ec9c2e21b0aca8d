"""`tandem serve` on the local twin of cluster.yaml (orchestrator/cluster_twin.py) under the real
Ray autoscaler: the head is `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=<twin>`, and
the pools ask for the role resources (tandem_context, tandem_generation) that only the fake
context_b200 and generation_gb200 nodes offer, so every worker runs on a node the autoscaler
launched. A completion crosses from the context node to the generation node; a burst of streams
makes the planner add a generation worker (the burst ends at that decision), for which the
autoscaler launches a new generation node; with no load the planner removes a generation worker
(drained, stopped), the autoscaler terminates the node left idle, and the remaining worker
serves. No request fails.

Each fake node has 1 CPU and each worker asks for 1, so one worker per node: a new worker needs
a new node. The twin's idle_timeout_minutes is 0.05 (3 s), the planner's interval 1 s. The twin's
head is started and stopped (by its temp dir, never `ray stop`) as in test_cluster_yaml.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml

from fake_cluster import CLUSTER_YAML, GCS_PORT, port_free, processes_of, stop_ray_under
from ray_serving import stop_local_ray
from worker_rpc import free_port

from tandem.models.gguf_metadata_cache import cache_root
from tandem.orchestrator.cluster_twin import make_twin

pytestmark = pytest.mark.slow

ROOT = CLUSTER_YAML.parent
IDLE_TIMEOUT_MIN = 0.05  # the twin's idle_timeout_minutes: a fake node idle for 3 s is terminated
KV_CACHE_BYTES = 64 * 737_280  # 64 blocks of 16 tokens of SmolLM2 in float32
READY_S = 240  # tandem serve: two nodes launched, two workers load the model, on 2 busy cores
SCALE_S = 180  # a scale-up (node launch + model load) or a scale-down (drain + idle timeout)
NUM_STREAMS = 8  # concurrent streams of the burst: twice what the profile says one worker holds
MAX_TOKENS = 24
POLICY = """
pools:
  context: {min_replicas: 1, max_replicas: 1}
  generation: {min_replicas: 1, max_replicas: 2}
slo: {ttft_ms: 60000, itl_ms: 1000}
max_gpus: 4
interval_s: 1
scale_up_cooldown_s: 0
scale_down_cooldown_s: 1
hysteresis: 0.2
"""
# max_concurrent_seqs 4: the burst's 8 decoding sequences ask for a second generation worker; the
# first request (2 tokens: Little's law makes it 2 tok/s x 1 s ITL SLO = 2 sequences) does not.
# Throughput is set out of the way.
PROFILE = {"prefill_tokens_per_s": 100000.0, "decode_tokens_per_s": 100000.0, "max_concurrent_seqs": 4}


def _write_twin(path: Path) -> None:
    twin = make_twin(yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8")), base_dir=ROOT)
    twin["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    path.write_text(yaml.safe_dump(twin, sort_keys=False), encoding="utf-8")


def _write_serve_config(folder: Path) -> Path:
    (folder / "policy.yaml").write_text(POLICY)
    (folder / "profile.json").write_text(json.dumps(PROFILE))
    pool = {"count": 1, "num_cpus": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": KV_CACHE_BYTES}
    config = {
        "served_model_name": "smollm2",
        "pools": {"context": {**pool, "resources": {"tandem_context": 1}},
                  "generation": {**pool, "resources": {"tandem_generation": 1}}},
        "router": {"local_prefill_max_tokens": 0},  # every prompt is prefilled on the context node
        "limits": {"request_timeout_s": 120},
        "autoscale": {"policy": str(folder / "policy.yaml"), "profile": str(folder / "profile.json")},
    }
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    return folder / "serve.yaml"


@contextlib.contextmanager
def fake_cluster(folder: Path, env: dict[str, str]) -> Iterator[str]:
    """The twin's head with its autoscaler; yields the GCS address. This process is a driver of it
    (for ray.nodes()). Stops every process of it by its temp dir at the end."""
    _write_twin(folder / "twin.yaml")
    temp_dir = tempfile.mkdtemp(prefix="tandem-twin-", dir="/tmp")  # short: Ray's socket paths live under it
    address = f"{ray.util.get_node_ip_address()}:{GCS_PORT}"
    try:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={GCS_PORT}",
                        f"--autoscaling-config={folder / 'twin.yaml'}", f"--temp-dir={temp_dir}",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                       check=True, capture_output=True, text=True, timeout=120)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        yield address
    finally:
        ray.shutdown()
        stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_of(temp_dir), "processes of the twin's Ray outlived the test"


@contextlib.contextmanager
def tandem_serve(address: str, config: Path, log: Path, env: dict[str, str]) -> Iterator[str]:
    """`tandem serve --address` on the twin; yields its URL. Ctrl-C at the end: it stops its
    workers and leaves Ray; it must exit 0."""
    port = free_port()
    tandem = str(Path(sys.executable).with_name("tandem"))
    with open(log, "wb") as out:
        process = subprocess.Popen([tandem, "serve", "--address", address, "--config", str(config),
                                    "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait(lambda: "Tandem is serving" in log.read_text(errors="replace") or process.poll() is not None, READY_S)
        assert process.poll() is None, f"tandem serve exited {process.returncode}:\n{_tail(log)}"
        yield f"http://127.0.0.1:{port}"
        process.send_signal(signal.SIGINT)
        assert process.wait(90) == 0, _tail(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_planner_scales_fake_nodes_of_the_twin_up_and_down(tmp_path: Path) -> None:
    if not port_free(GCS_PORT):
        pytest.skip(f"port {GCS_PORT} is taken; the fake provider needs the GCS there")
    stop_local_ray()  # the one other test modules share: this process becomes a driver of the twin's
    if ray.is_initialized():
        pytest.skip("this process is connected to another Ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TANDEM_CACHE_DIR": str(cache_root())}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    started = time.monotonic()
    with fake_cluster(tmp_path, env) as address, tandem_serve(address, _write_serve_config(tmp_path), log, env) as url:
        up_s = time.monotonic() - started
        first = _role_nodes()
        assert len(first["tandem_context"]) == 1 and len(first["tandem_generation"]) == 1, first
        reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].strip() and reply.json()["usage"]["completion_tokens"] == 2
        paths = httpx.get(f"{url}/health", timeout=10).json()["kv_transfer"]["paths"]
        assert paths["context-0->generation-0"]["ok"], paths  # the KV crossed from one fake node to another

        assert "planner: scale up" not in log.read_text(errors="replace"), "one request of two tokens scaled up"
        burst_started = time.monotonic()
        results = asyncio.run(_burst_until(url, lambda: "planner: scale up" in log.read_text(errors="replace")))
        assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200]
        assert all(f'"completion_tokens":{MAX_TOKENS}' in text.replace(" ", "") for _, text in results)
        _wait(lambda: len(_role_nodes()["tandem_generation"]) == 2, SCALE_S, lambda: f"{_role_nodes()}\n{_tail(log)}")
        grown = _role_nodes()["tandem_generation"]
        assert first["tandem_generation"] < grown, "the new generation node replaced the first one"
        _wait(lambda: "worker generation-1 added" in log.read_text(errors="replace"), SCALE_S, lambda: _tail(log))
        scaled_up_s = time.monotonic() - burst_started

        idle_since = time.monotonic()
        _wait(lambda: len(_role_nodes()["tandem_generation"]) == 1 and len(_generation_workers(url)) == 1, SCALE_S,
              lambda: f"{_role_nodes()} {_generation_workers(url)}\n{_tail(log)}")
        scaled_down_s = time.monotonic() - idle_since
        (removed,) = grown - _role_nodes()["tandem_generation"]
        assert not next(node["Alive"] for node in ray.nodes() if node["NodeID"] == removed)
        assert _role_nodes()["tandem_context"] == first["tandem_context"]
        after = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert after.status_code == 200 and after.json()["choices"][0]["text"].strip(), after.text
        (remaining,) = _generation_workers(url)
        paths = httpx.get(f"{url}/health", timeout=10).json()["kv_transfer"]["paths"]
        assert paths[f"context-0->{remaining}"]["ok"] and all(path["ok"] for path in paths.values()), paths
    text = log.read_text(errors="replace")
    assert "planner: scale up: context 1->1, generation 1->2" in text, _tail(log)
    assert "planner: scale down: context 1->1, generation 2->1" in text, _tail(log)
    assert "worker generation-1 added" in text and "removed after finishing" in text
    print(f"serving {up_s:.0f} s after ray start; {len(results)} streams, then generation-1 joined on a new node "
          f"{scaled_up_s:.0f} s after the burst began; a generation worker and its node gone {scaled_down_s:.0f} s "
          f"later, {remaining} left; {time.monotonic() - started:.0f} s in all")


async def _burst_until(url: str, done: Callable[[], bool]) -> list[tuple[int, str]]:
    """NUM_STREAMS clients stream one completion after another until ``done()`` (polled off the
    loop); returns (status, body) of every request."""
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def client(http: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            body = {"model": "smollm2", "prompt": f"Story number {i}: once upon a time", "max_tokens": MAX_TOKENS,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
                results.append((reply.status_code, (await reply.aread()).decode()))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=NUM_STREAMS + 2)) as http:
        clients = [asyncio.create_task(client(http, i)) for i in range(NUM_STREAMS)]
        deadline = time.monotonic() + SCALE_S
        while not await asyncio.to_thread(done):
            assert time.monotonic() < deadline, "no second generation node and worker while the burst ran"
            assert not any(task.done() for task in clients), [task.exception() for task in clients if task.done()]
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
    return results


def _role_nodes() -> dict[str, set[str]]:
    """Ids of the alive nodes offering each role resource."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    return {role: {node["NodeID"] for node in alive if role in node["Resources"]}
            for role in ("tandem_context", "tandem_generation")}


def _generation_workers(url: str) -> list[str]:
    """The generation workers the orchestrator routes to, by /health."""
    workers: dict[str, Any] = httpx.get(f"{url}/health", timeout=10).json()["workers"]
    return sorted(worker for worker, healthy in workers.items() if healthy and worker.startswith("generation-"))


def _wait(condition: Callable[[], bool], timeout: float, describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {describe()}"
        time.sleep(0.5)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]
