"""One request through real tiny worker processes: disaggregated and local-prefill routes give
transformers' tokens with a TTFT waterfall; a failing KV hand-off path is reported and routed
around; a generation worker killed mid-stream is retried on another, as one stream; a stream
closed after its first token releases its KV handle at once."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from tandem.orchestrator.cluster import Cluster, WorkerInfo
from tandem.orchestrator.pipeline import Pipeline, Waterfall
from tandem.orchestrator.router import KVAwareRouter, RoundRobinRouter

PROMPT = [11, 140, 23, 64, 3, 98, 131, 45, 7, 88, 19, 156, 72, 30]
PARAMS = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def workers(start_worker, tiny_llama):
    args = ["--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32", "--block-size", "4",
            "--kv-cache-bytes", str(64 * 2048)]
    launched = {
        "context": start_worker.launch("context", *args, "--worker-id", "ctx-0"),
        "context-1": start_worker.launch("context", *args, "--worker-id", "ctx-1"),
        "gen-0": start_worker.launch("generation", *args, "--worker-id", "gen-0"),
        "gen-1": start_worker.launch("generation", *args, "--worker-id", "gen-1"),
        "ctx-bs8": start_worker.launch("context", *args, "--block-size", "8", "--worker-id", "ctx-bs8"),
    }
    return dict(zip(launched, start_worker.all(*launched.values())))


def expected(tiny_llama, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = tiny_llama[1].generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


async def run_request(cluster: Cluster, router, request_id: str, prompt=PROMPT, params=PARAMS, on_delta=None):
    pipeline = Pipeline(cluster, router, max_retries=1, request_timeout_s=60)
    waterfall = Waterfall()
    tokens, deltas = [], []
    async for delta in pipeline.generate(request_id, prompt, params, waterfall):
        tokens.extend(delta.token_ids)
        deltas.append(delta)
        if on_delta is not None:
            on_delta(delta)
    return tokens, deltas, waterfall


def make_cluster(workers, names) -> Cluster:
    cluster = Cluster(block_size=4)
    for name in names:
        cluster.add(WorkerInfo.from_ready(workers[name].ready))
    return cluster


def test_disaggregated_and_local_prefill_routes_give_transformers_tokens(workers, tiny_llama) -> None:
    async def run():
        cluster = make_cluster(workers, ["context", "gen-0"])
        try:
            await cluster.refresh_loads()
            disaggregated = await run_request(cluster, KVAwareRouter(local_prefill_max_tokens=0), "pipe-1")
            local = await run_request(cluster, KVAwareRouter(local_prefill_max_tokens=1000), "pipe-2")
            return disaggregated, local, cluster.transfer_report()
        finally:
            await cluster.close()

    (tokens, deltas, waterfall), (local_tokens, local_deltas, local_waterfall), report = asyncio.run(run())
    assert tokens == local_tokens == expected(tiny_llama, PROMPT, 40)
    assert waterfall.route.context_worker == "ctx-0" and waterfall.route.reason == "disaggregated"
    assert deltas[0].token_ids and deltas[0].transfer is None  # the first token, straight from the prefill
    assert deltas[1].transfer is not None and deltas[1].transfer.num_blocks == 4
    assert waterfall.transfer_bytes > 0 and 0 < waterfall.queue_s < waterfall.prefill_s
    assert waterfall.first_decode_s > 0
    # Locally the worker may stream its first two tokens in one delta (the CPU kernels made that
    # common): then no decode step stands between them to time, and the waterfall leaves it unset.
    assert local_waterfall.first_decode_s > 0 or len(local_deltas[0].token_ids) > 1
    assert report["status"] == "ok" and report["paths"]["ctx-0->gen-0"]["ok"]
    assert report["paths"]["ctx-0->gen-0"]["detail"].startswith(f"{waterfall.transfer_bytes} B in ")
    assert local_waterfall.route.context_worker is None and local_waterfall.route.reason == "local_prefill"
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 40


def test_a_repeated_prefix_goes_to_the_context_worker_that_holds_it(workers, tiny_llama) -> None:
    """ctx-1 computes the prefix first; a later orchestrator, which learns it from ctx-1's KV
    events (replayed when it starts following), sends the repeat there although a tie would pick
    ctx-0."""
    prefix = [7, 21, 130, 4, 99, 62, 150, 33, 18, 76, 5, 140]  # three full blocks

    async def first_on_ctx1() -> None:
        cluster = make_cluster(workers, ["context-1", "gen-0"])
        try:
            await run_request(cluster, KVAwareRouter(local_prefill_max_tokens=0), "prefix-a", prefix + [1, 2])
        finally:
            await cluster.close()

    async def repeat():
        cluster = make_cluster(workers, ["context", "context-1", "gen-0"])
        try:
            await cluster.refresh_loads()
            for _ in range(300):
                if cluster.cached_blocks(prefix).get("ctx-1") == 3:
                    break
                await asyncio.sleep(0.01)
            return await run_request(cluster, KVAwareRouter(local_prefill_max_tokens=0), "prefix-b", prefix + [9, 9, 9])
        finally:
            await cluster.close()

    asyncio.run(first_on_ctx1())
    tokens, _, waterfall = asyncio.run(repeat())
    assert waterfall.route.context_worker == "ctx-1" and waterfall.route.cached_tokens_on_context == 12
    assert tokens == expected(tiny_llama, prefix + [9, 9, 9], 40)


def test_a_generation_worker_killed_mid_stream_is_retried_as_one_stream(workers, tiny_llama) -> None:
    victim = workers["gen-0"]

    async def run():
        cluster = make_cluster(workers, ["context", "gen-0", "gen-1"])
        try:
            await cluster.refresh_loads()
            pipeline = Pipeline(cluster, RoundRobinRouter(local_prefill_max_tokens=0), max_retries=1, request_timeout_s=60)
            waterfall, tokens = Waterfall(), []
            async for delta in pipeline.generate("pipe-kill", PROMPT, PARAMS, waterfall):
                tokens.extend(delta.token_ids)
                if len(tokens) >= 5 and waterfall.attempts == 1:
                    assert waterfall.route.generation_worker == "gen-0"  # round robin starts there
                    os.kill(victim.process.pid, signal.SIGKILL)
                    victim.process.wait(10)
                    cluster.remove("gen-0")  # as the pools do when they see the actor die
            return tokens, waterfall
        finally:
            await cluster.close()

    tokens, waterfall = asyncio.run(run())
    assert waterfall.attempts == 2 and waterfall.route.generation_worker == "gen-1"
    assert "UNAVAILABLE" in waterfall.retries[0]
    assert tokens == expected(tiny_llama, PROMPT, 40)


def test_a_failing_transfer_path_is_reported_and_prefill_falls_back_to_the_generation_worker(workers, tiny_llama) -> None:
    """ctx-bs8 cannot pair with gen-1 (8-token blocks against 4): the hand-off fails with the
    pairing error, the path is reported failing, and the next request prefills on gen-1 itself."""
    from tandem.orchestrator.worker_client import WorkerCallError

    async def run():
        cluster = make_cluster(workers, ["ctx-bs8", "gen-1"])
        try:
            await cluster.refresh_loads()
            router = KVAwareRouter(local_prefill_max_tokens=0)
            with pytest.raises(WorkerCallError) as failed:
                await run_request(cluster, router, "bad-pair")
            report = cluster.transfer_report()
            return failed.value, report, await run_request(cluster, router, "after-bad-pair")
        finally:
            await cluster.close()

    error, report, (tokens, _, waterfall) = asyncio.run(run())
    assert error.code == "FAILED_PRECONDITION" and "block_size" in error.message
    assert report["status"] == "failing" and not report["paths"]["ctx-bs8->gen-1"]["ok"]
    assert "block_size" in report["paths"]["ctx-bs8->gen-1"]["detail"]
    assert waterfall.route.context_worker is None and tokens == expected(tiny_llama, PROMPT, 40)


def test_a_caller_that_stops_after_the_first_token_releases_the_lease_at_once(workers) -> None:
    """Closed right after the first delta, before the generation worker was called: the context
    worker's lease is released now, not when it expires (30 s)."""

    async def run():
        cluster = make_cluster(workers, ["context-1", "gen-1"])
        try:
            await cluster.refresh_loads()
            pipeline = Pipeline(cluster, RoundRobinRouter(local_prefill_max_tokens=0), max_retries=0, request_timeout_s=60)
            stream = pipeline.generate("pipe-first-only", PROMPT, PARAMS)
            first = await anext(stream)
            await stream.aclose()
            for _ in range(200):  # 10 s at most
                if not (stats := await cluster.client("ctx-1").stats()).num_leases:
                    break
                await asyncio.sleep(0.05)
            return first, stats
        finally:
            await cluster.close()

    first, stats = asyncio.run(run())
    assert len(first.token_ids) == 1
    assert stats.num_leases == 0 and stats.num_free_blocks == stats.num_total_blocks, stats
