"""The REST app over Ray worker pools, wired by the same function as `tandem serve` (real Ray,
real uvicorn, SmolLM2 actors: two context and two generation workers), with a cluster token
(security.cluster_token_file):

- the orchestrator's calls and the generation workers' calls to context workers carry the token;
  a call without it is refused and counted by the worker;
- kv_aware sends a prompt to the context worker that holds its prefix (learned from KV events);
- a short prompt is prefilled on the generation worker itself (no context worker runs it);
- a generation worker whose process is killed mid-stream: the openai client sees one stream whose
  text equals the offline greedy text, Ray restarts the worker with a new epoch, and afterwards
  every worker's blocks are free.

Which worker did the work is read from each worker's own Stats (prompt tokens it computed).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray

from ray_serving import WAIT_S, Served, serve_on_ray
from tandem.orchestrator.worker_client import WorkerCallError, WorkerClient
from tandem.workers.sampling_params import SamplingParams

KV_CACHE_BYTES = 64 * 737_280  # 64 blocks of 16 tokens of SmolLM2 in float32
LONG_PROMPT = "Tell me a long story about a lighthouse keeper who finds a message in a bottle. " * 2


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tandem.orchestrator.serve_config import ServeConfig

    token_file = Path(tmp_path_factory.mktemp("token")) / "cluster-token"
    token_file.write_text("a-long-random-cluster-token\n")
    pool = {"count": 2, "device": "cpu", "dtype": "float32", "kv_cache_bytes": KV_CACHE_BYTES}
    config = ServeConfig.model_validate({
        "served_model_name": "smollm2",
        "pools": {"context": pool, "generation": pool},
        "router": {"policy": "kv_aware", "local_prefill_max_tokens": 8, "max_retries": 2},
        "limits": {"request_timeout_s": 120},
        "security": {"cluster_token_file": str(token_file)},
    })
    with serve_on_ray(config) as served:
        yield served


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=180)


def computed(served: Served) -> dict[str, int]:
    return {worker: stats.num_prompt_tokens_computed for worker, stats in served.worker_stats().items()}


def test_requests_flow_with_the_token_and_calls_without_it_are_refused(served: Served, client) -> None:
    # Past local_prefill_max_tokens, so it goes through a context worker; not LONG_PROMPT, whose
    # prefix the next test wants on one context worker only.
    prompt = "Write two sentences about the history of the harbour town and its old stone bridge."
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 8
    stats = served.worker_stats()  # with the token
    assert sum(s.num_transferred_blocks for s in stats.values()) > 0  # a generation worker READ from a context worker

    async def without_token(address: str) -> str:
        anonymous = WorkerClient(address, timeout_s=10)
        try:
            await anonymous.stats()
        except WorkerCallError as error:
            return error.code
        finally:
            await anonymous.close()
        return "OK"

    for info in served.pools.workers():
        assert asyncio.run(without_token(info.address)) == "UNAUTHENTICATED"
    assert all(s.num_unauthenticated == 1 for s in served.worker_stats().values())
    served.wait_until_every_block_is_free(4)


def test_kv_aware_follows_the_prefix_and_short_prompts_prefill_locally(served, client, smollm2) -> None:
    """context-1 computes the prefix first (called directly, as another router would); the app,
    which learns it from context-1's KV events, sends the longer prompt there although both
    context workers are idle (a tie goes to context-0)."""
    prompt = smollm2.tokenizer.encode(LONG_PROMPT)
    address = next(info.address for info in served.pools.workers() if info.worker_id == "context-1")

    async def seed() -> None:
        worker = WorkerClient(address, timeout_s=60, auth=served.auth)
        try:
            reply = await worker.prefill("seed", prompt, {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True}, timeout_s=60)
            assert reply.handle is not None  # the prompt KV stays under a lease until released
            await worker.release(reply.handle)
        finally:
            await worker.close()

    asyncio.run(seed())
    time.sleep(1.0)  # the KV events reach the orchestrator's block index
    before = computed(served)
    client.completions.create(model="smollm2", prompt=prompt + prompt[:5], max_tokens=2, temperature=0)
    after = computed(served)
    grown = {w: after[w] - before[w] for w in after if after[w] > before[w]}
    assert list(grown) == ["context-1"] and grown["context-1"] < 16 + 5, grown  # only the uncached tail
    before = after
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, temperature=0)
    after = computed(served)
    grown = {w for w in after if after[w] > before[w]}
    assert len(grown) == 1 and grown.pop().startswith("generation"), (before, after)


def test_a_generation_worker_killed_mid_stream_finishes_as_one_stream_and_frees_every_block(
    served, client, make_llm
) -> None:
    pools = served.pools
    epochs = {info.worker_id: info.epoch for info in pools.workers()}
    stream = client.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=48, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    text, victim = [], None
    for chunk in stream:
        text.append(chunk.choices[0].text)
        if victim is None and len(text) == 6:
            busy = [w for w, s in served.worker_stats().items() if w.startswith("generation") and s.num_running]
            assert len(busy) == 1, busy
            victim = busy[0]
            ray.kill(pools.actor(victim), no_restart=False)  # its process dies; Ray restarts it
    expected = make_llm().generate(LONG_PROMPT, SamplingParams(max_tokens=48, ignore_eos=True))[0].text
    assert "".join(text) == expected
    deadline = time.monotonic() + WAIT_S
    while True:
        infos = {info.worker_id: info for info in pools.workers()}
        if victim in infos and infos[victim].epoch != epochs[victim]:
            break
        assert time.monotonic() < deadline, f"{victim} did not come back"
        time.sleep(0.5)
    served.wait_until_every_block_is_free(expected_workers=4)
