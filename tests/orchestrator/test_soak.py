"""Load and soak: 1,000 streaming completions opened at once through the REST app, on a real local
Ray with the embedded SmolLM2 on the CPU (one context and two generation workers, short prompts,
6 tokens each), twice: undisturbed, then with two workers SIGKILLed mid-soak.

Every request must end as one of: completed (its 6 tokens, finish_reason ``length``, then
``[DONE]``), 429 with Retry-After (past ``limits.max_concurrent_requests``), 503 with Retry-After
(no worker can serve it, or a retriable failure before the first token), or, once its stream has
begun, one OpenAI-shaped ``server_error`` event then ``[DONE]``. Nothing hangs, no connection
drops without a status, no other status, and the app's own counter saw every request. Undisturbed,
every admitted request completes. Afterwards the app holds no admission slot and no extra task,
the orchestrator's RSS (it runs in this process: uvicorn in a thread) has grown by a bounded
amount, every worker's blocks are free and /health is ok; after the kills, requests on the victims
were retried, both victims are back with new epochs and the restarted context worker hands KV off
again. The load comes from a process of its own (tests/soak_client.py), so that its CPU and memory
are not counted as the orchestrator's.

Run ``-s`` to see the numbers each soak prints.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray

from ray_serving import WAIT_S, Served, serve_on_ray

MODEL = "smollm2"
NUM_REQUESTS = 1000
MAX_TOKENS = 6
MAX_CONCURRENT = 768  # so that a burst of 1,000 also meets the 429 path
REQUEST_TIMEOUT_S = 90.0  # limits.request_timeout_s: far above a soak's slowest request (about 40 s)
# Per request, at the client: request_timeout_s bounds a request, retries included; the soak
# client's process is bounded a little above this.
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30
SEED = 9
NUM_KILLS = 2
KV_CACHE_BYTES = 1024 * 737_280  # 1,024 blocks of 16 tokens of SmolLM2 in float32, per worker
RSS_GROWTH_LIMIT = 96 << 20  # after a soak, against before it (measured: 6 to 20 MiB)
RSS_PEAK_LIMIT = 256 << 20  # during a soak, against before it (measured: about 30 MiB)
CLEAN_STATUSES = {429, 503}  # 429 past max_concurrent_requests, 503 no worker or a retriable failure (app.py)
SOAK_CLIENT = Path(__file__).resolve().parent.parent / "soak_client.py"
WORKERS = ["context-0", "generation-0", "generation-1"]


@pytest.fixture(scope="module")
def served(local_ray) -> Iterator[Served]:
    from tandem.orchestrator.serve_config import ServeConfig

    pool = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": KV_CACHE_BYTES}
    config = ServeConfig.model_validate({
        "served_model_name": MODEL,
        "pools": {"context": {**pool, "count": 1}, "generation": {**pool, "count": 2}},
        "router": {"policy": "kv_aware", "local_prefill_max_tokens": 8, "max_retries": 1},
        "limits": {"max_concurrent_requests": MAX_CONCURRENT, "request_timeout_s": REQUEST_TIMEOUT_S},
    })

    def keep_state(served: Served, state: Any) -> None:
        served.extra["state"] = state

    with serve_on_ray(config, keep_state) as served:
        yield served


# -- the soak and what it leaves -------------------------------------------------------------


def start_soak(url: str, out: Path) -> subprocess.Popen:
    argv = [sys.executable, str(SOAK_CLIENT), url, str(NUM_REQUESTS), str(MAX_TOKENS), str(CLIENT_TIMEOUT_S), MODEL, str(out)]
    return subprocess.Popen(argv)


def finish_soak(process: subprocess.Popen, out: Path) -> dict[str, Any]:
    assert process.wait(CLIENT_TIMEOUT_S + 60) == 0, "the soak client failed"
    return json.loads(out.read_text(encoding="utf-8"))


def messages(outcomes: list[dict[str, Any]]) -> Counter:
    """The errors' messages, without request ids and addresses, by how often they came."""
    return Counter(re.sub(r"cmpl-\w+|[\d.]+:\d+", "*", o["message"])[:100] for o in outcomes if o["message"])


def tally(outcomes: list[dict[str, Any]]) -> Counter:
    """Outcomes by kind and status (and error type): 'completed', 'error 429 rate_limit_error', ..."""
    return Counter(" ".join(filter(None, (o["kind"], str(o["status"]) if o["kind"] == "error" else "", o["detail"])))
                   if o["kind"] != "completed" else "completed" for o in outcomes)


def assert_every_request_accounted_for(outcomes: list[dict[str, Any]]) -> Counter:
    counts = tally(outcomes)
    assert len(outcomes) == NUM_REQUESTS
    lost = [o for o in outcomes if o["kind"] == "lost"]
    assert not lost, (counts, lost[:5])
    undocumented = [o for o in outcomes if o["kind"] == "error" and o["status"] not in CLEAN_STATUSES]
    assert not undocumented, (counts, undocumented[:5])
    # After its status line a stream can only fail as an event; a server_error is the 503/500 family.
    assert {o["detail"].split()[0] for o in outcomes if o["kind"] == "sse_error"} <= {"server_error"}, counts
    assert counts["completed"] > 0, (counts, messages(outcomes))
    return counts


def server_counts(served: Served) -> Counter:
    """The app's own counters (Prometheus): /v1/completions answers by status, retries, routes."""
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    counts: Counter = Counter()
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("tandem_requests_total{") and 'endpoint="/v1/completions"' in line:
            counts[line.split('status="')[1].split('"')[0]] += int(float(value))
        elif line.startswith("tandem_retries_total "):
            counts["retries"] += int(float(value))
        elif line.startswith("tandem_routes_total{"):
            counts["route " + line.split('reason="')[1].split('"')[0]] += int(float(value))
    return counts


def app_tasks(served: Served) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return served.on_app_loop(count())


def settled(served: Served, tasks_before: int, timeout: float = 30) -> int:
    """Wait until the app holds no admission slot and no more tasks than before the soak."""
    deadline = time.monotonic() + timeout
    while True:
        in_flight, tasks = served.extra["state"].in_flight, app_tasks(served)
        if in_flight == 0 and tasks <= tasks_before:
            return tasks
        assert time.monotonic() < deadline, f"{in_flight} requests still admitted, {tasks} tasks (before: {tasks_before})"
        time.sleep(0.2)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


class PeakRss:
    """The largest RSS of this process (the orchestrator's), sampled every 0.2 s while in use."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def health(served: Served) -> tuple[int, dict[str, Any]]:
    reply = httpx.get(f"{served.url}/health", timeout=30)
    return reply.status_code, reply.json()


def wait_for_health_ok(served: Served, timeout: float = 45) -> dict[str, Any]:
    """/health ok with every worker healthy (a KV hand-off failure is remembered for 30 s)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = health(served)
        if status == 200 and body["status"] == "ok" and body["workers"] == dict.fromkeys(WORKERS, True):
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.5)


def complete_one(served: Served, i: int, prompt: str | None = None) -> str:
    body = {"model": MODEL, "prompt": prompt or f"After the soak {i}:", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    reply = httpx.post(f"{served.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "length" and reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
    return choice["text"]


def report(name: str, **numbers: Any) -> None:
    print(f"\n[{name}] " + json.dumps(numbers, default=str), flush=True)


# -- the tests ---------------------------------------------------------------------------------


def soak_and_check(served: Served, tmp_path: Path, during=None) -> dict[str, Any]:
    """One soak with every invariant but the kill test's own; ``during(process)`` runs while it
    does. Returns the numbers."""
    complete_one(served, -1)  # warm: tokenizer, channels, first steps
    tasks_before, rss_before, server_before = app_tasks(served), rss(), server_counts(served)
    out = tmp_path / "soak.json"
    start = time.monotonic()
    with PeakRss() as peak:
        process = start_soak(served.url, out)
        try:
            extra = during(process) if during is not None else {}
        finally:
            result = finish_soak(process, out)
    seconds = time.monotonic() - start
    counts = assert_every_request_accounted_for(result["outcomes"])
    server_delta = server_counts(served) - server_before
    served_by_status = Counter({k: v for k, v in server_delta.items() if k.isdigit()})
    assert sum(served_by_status.values()) == NUM_REQUESTS, served_by_status  # the app answered each one
    assert served_by_status["200"] == counts["completed"] + sum(o["kind"] == "sse_error" for o in result["outcomes"])
    tasks_after = settled(served, tasks_before)
    rss_after = rss()
    numbers = dict(seconds=round(seconds, 1), client_seconds=round(result["seconds"], 1), outcomes=dict(counts),
                   server=dict(server_delta), rss_before_mib=rss_before >> 20,
                   rss_peak_mib=peak.peak >> 20, rss_after_mib=rss_after >> 20, tasks=(tasks_before, tasks_after),
                   slowest_request_s=round(max(o["seconds"] for o in result["outcomes"]), 1),
                   error_messages=dict(messages(result["outcomes"]).most_common(6)), **extra)
    assert rss_after - rss_before < RSS_GROWTH_LIMIT and peak.peak - rss_before < RSS_PEAK_LIMIT, numbers
    return numbers


@pytest.mark.slow
def test_a_thousand_streams_at_once_complete_or_get_429_and_leave_nothing_behind(served, tmp_path) -> None:
    numbers = soak_and_check(served, tmp_path)
    report("soak", **numbers)
    # Undisturbed, an admitted request completes: the only error is the admission limit's 429.
    assert set(numbers["outcomes"]) <= {"completed", "error 429 rate_limit_error"}, numbers
    assert numbers["outcomes"]["completed"] >= MAX_CONCURRENT, numbers
    served.wait_until_every_block_is_free(expected_workers=len(WORKERS), timeout=60)
    wait_for_health_ok(served, timeout=5)
    complete_one(served, 0)


def kill_mid_soak(served: Served, victims: list[str], rng: random.Random, process: subprocess.Popen) -> dict[str, Any]:
    """SIGKILL each victim's process at a random moment of the soak, then time until the pool has
    it back (Ray restarts the actor: a fresh process, a new epoch)."""
    pools, state = served.pools, served.extra["state"]
    epochs = {info.worker_id: info.epoch for info in pools.workers()}
    pids = {v: ray.get(pools.actor(v).__ray_call__.remote(lambda actor: os.getpid()), timeout=60) for v in victims}
    deadline = time.monotonic() + 60
    while state.in_flight < 100:  # the soak is under way
        assert process.poll() is None and time.monotonic() < deadline, "the soak never got going"
        time.sleep(0.05)
    killed_at, in_flight_at_kill = {}, []
    for victim in victims:
        time.sleep(rng.uniform(0.5, 4.0))
        in_flight_at_kill.append(state.in_flight)
        os.kill(pids[victim], signal.SIGKILL)
        killed_at[victim] = time.monotonic()
    assert all(in_flight_at_kill), f"a kill came after the soak: {in_flight_at_kill} requests in flight"
    back: dict[str, float] = {}
    deadline = time.monotonic() + WAIT_S
    while len(back) < len(victims):  # timed while the soak may still run
        infos = {info.worker_id: info for info in pools.workers()}
        back |= {v: time.monotonic() for v in victims if v not in back and v in infos and infos[v].epoch != epochs[v]}
        assert time.monotonic() < deadline, f"not back after {WAIT_S} s: {set(victims) - set(back)}"
        time.sleep(0.1)
    return dict(victims=victims, in_flight_at_kill=in_flight_at_kill, old_epochs={v: epochs[v] for v in victims},
                recovery_s={v: round(back[v] - killed_at[v], 1) for v in victims})


@pytest.mark.slow
def test_a_thousand_streams_with_two_workers_killed_mid_soak_recover_fully(served, tmp_path) -> None:
    rng = random.Random(SEED)
    # The context worker and one generation worker, in a random order: one worker of each role
    # always serves (with no context worker the generation workers prefill themselves).
    victims = rng.sample(["context-0", rng.choice(["generation-0", "generation-1"])], NUM_KILLS)
    assert sorted(info.worker_id for info in served.pools.workers()) == WORKERS
    numbers = soak_and_check(served, tmp_path, during=functools.partial(kill_mid_soak, served, victims, rng))
    report("soak with kills", **numbers)
    assert numbers["server"].get("retries", 0) > 0, numbers  # requests in flight on a victim were retried
    # Full strength: the same workers, the victims with new epochs, every block free, /health ok.
    pools = served.pools
    infos = {info.worker_id: info for info in pools.workers()}
    assert sorted(infos) == WORKERS and pools.count("generation") == 2 and pools.count("context") == 1
    assert all(infos[v].epoch != numbers["old_epochs"][v] for v in victims)
    served.wait_until_every_block_is_free(expected_workers=len(WORKERS), timeout=60)
    wait_for_health_ok(served)
    # The restarted context worker prefills and hands KV off again: prompts past the local limit.
    before = server_counts(served)
    for i in range(4):
        complete_one(served, i, prompt=f"After the soak {i}, the lighthouse keeper wrote a long letter home:")
    assert (server_counts(served) - before)["route disaggregated"] == 4
