"""The planner inside the orchestrator, on a real local Ray: a burst of streams makes it add a
generation worker (a new Ray actor that joins routing), and when the load is gone it removes one
(drained, then stopped); every request finishes with all its tokens and every block comes back.
The steps are driven by the test (the loop's timer is the only thing left out), with the
synthetic model so workers start in seconds.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from ray_serving import WAIT_S, Served, serve_on_ray
from tandem.orchestrator.planner import Action

NUM_REQUESTS = 24
MAX_TOKENS = 750  # 24 such streams on one synthetic worker decode for ~8 s here: well past the step at 1.5 s
POLICY = """
pools:
  context: {min_replicas: 1, max_replicas: 1}
  generation: {min_replicas: 1, max_replicas: 2}
slo: {ttft_ms: 2000, itl_ms: 200}
max_gpus: 4
interval_s: 1
scale_up_cooldown_s: 0
scale_down_cooldown_s: 1
hysteresis: 0.2
"""
PROFILE = {"prefill_tokens_per_s": 100000.0, "decode_tokens_per_s": 100000.0, "max_concurrent_seqs": 16}


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory) -> Iterator[Served]:
    from tandem.orchestrator.autoscaler import Autoscaler
    from tandem.orchestrator.serve import load_planner
    from tandem.orchestrator.serve_config import ServeConfig

    directory = tmp_path_factory.mktemp("autoscale")
    (directory / "policy.yaml").write_text(POLICY)
    (directory / "profile.json").write_text(json.dumps(PROFILE))
    pool = {"count": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": 4 << 20}
    config = ServeConfig.model_validate({
        "model": "synthetic",
        "pools": {"context": pool, "generation": pool},
        "router": {"policy": "least_load", "local_prefill_max_tokens": 0},
        "autoscale": {"policy": str(directory / "policy.yaml"), "profile": str(directory / "profile.json")},
    })
    planner = load_planner(config)

    def add_autoscaler(served: Served, state) -> None:  # stepped by the test, not by its timer
        served.extra["autoscaler"] = Autoscaler(planner, served.pools, state.cluster, state.interval_stats)

    with serve_on_ray(config, on_start=add_autoscaler) as served:
        yield served


def step(served: Served):
    return served.on_app_loop(served.extra["autoscaler"].step())


async def stream(http: httpx.AsyncClient, url: str, i: int) -> tuple[int, str]:
    body = {"model": "synthetic", "prompt": [100 + i, 7, 8, 9], "max_tokens": MAX_TOKENS, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
        return reply.status_code, (await reply.aread()).decode()


def test_a_burst_adds_a_generation_worker_and_idleness_removes_it(served: Served) -> None:
    pools = served.pools

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=WAIT_S, limits=httpx.Limits(max_connections=64)) as http:
            streams = [asyncio.create_task(stream(http, served.url, i)) for i in range(NUM_REQUESTS)]
            await asyncio.sleep(1.5)  # every stream is decoding: 24 sequences on one worker that holds 16
            decision = await asyncio.to_thread(step, served)
            assert decision.action is Action.SCALE_UP and decision.generation_replicas == 2, decision.reason
            assert "concurrency" in decision.reason
            assert pools.count("generation") == 2
            return await asyncio.gather(*streams)

    results = asyncio.run(burst())
    assert [status for status, _ in results] == [200] * NUM_REQUESTS
    assert all(f'"completion_tokens":{MAX_TOKENS}' in text.replace(" ", "") for _, text in results)
    for _ in range(30):  # idle: the forecast decays, then the scale-down cooldown passes
        time.sleep(0.5)
        decision = step(served)
        if decision.action is Action.SCALE_DOWN:
            break
    assert decision.action is Action.SCALE_DOWN and decision.generation_replicas == 1, decision.reason
    assert pools.count("generation") == 1 and pools.count("context") == 1
    served.wait_until_every_block_is_free(expected_workers=2)
