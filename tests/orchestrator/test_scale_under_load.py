"""Resizing the pools while requests stream through the REST app, on a real local Ray: a
generation worker added mid-load takes requests; one removed mid-load leaves routing, drains and
stops, and no request fails; afterwards every remaining worker's blocks are free and the removed
worker's actor is gone. The workers run the synthetic model (models/synthetic.py): the serving
path is what is under test, and it starts in seconds.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from ray_serving import WAIT_S, Served, serve_on_ray, stats_of

NUM_REQUESTS = 24
MAX_TOKENS = 1000


@pytest.fixture(scope="module")
def served(local_ray) -> Iterator[Served]:
    from tandem.orchestrator.serve_config import ServeConfig

    pool = {"count": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": 4 << 20}
    config = ServeConfig.model_validate({
        "model": "synthetic",
        "pools": {"context": pool, "generation": pool},
        "router": {"policy": "least_load", "local_prefill_max_tokens": 0},
        "limits": {"request_timeout_s": 120},
    })
    with serve_on_ray(config) as served:
        yield served


async def stream(http: httpx.AsyncClient, url: str, i: int) -> tuple[int, int, str]:
    """(status, completion tokens from the usage chunk, the raw body's tail)."""
    body = {"model": "synthetic", "prompt": [100 + i, 7, 8, 9, 10, 11], "max_tokens": MAX_TOKENS, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
        text = (await reply.aread()).decode()
    usage = [line for line in text.splitlines() if '"usage"' in line and '"completion_tokens"' in line]
    tokens = int(usage[-1].split('"completion_tokens":')[1].split(",")[0].strip(" }")) if usage else -1
    return reply.status_code, tokens, text[-200:]


def test_adding_and_removing_a_generation_worker_under_load_loses_no_request(served: Served) -> None:
    pools = served.pools

    async def load_while_resizing() -> tuple[list[tuple[int, int, str]], int]:
        async with httpx.AsyncClient(timeout=WAIT_S, limits=httpx.Limits(max_connections=64)) as http:
            first = [asyncio.create_task(stream(http, served.url, i)) for i in range(NUM_REQUESTS // 2)]
            added = await asyncio.to_thread(served.on_app_loop, pools.add_worker("generation"))
            second = [asyncio.create_task(stream(http, served.url, i)) for i in range(NUM_REQUESTS // 2, NUM_REQUESTS)]
            await asyncio.sleep(1.0)
            running = (await stats_of(next(i.address for i in pools.workers() if i.worker_id == "generation-0"))).num_running
            assert running > 0, "generation-0 must hold streams when it is removed, or the drain is not tested"
            finished = await asyncio.to_thread(served.on_app_loop, pools.remove_worker("generation-0"))
            assert added.worker_id == "generation-1"
            return await asyncio.gather(*first, *second), finished

    results, finished_while_draining = asyncio.run(load_while_resizing())
    assert [(status, tokens) for status, tokens, _ in results] == [(200, MAX_TOKENS)] * NUM_REQUESTS, results
    assert all('"error"' not in tail for _, _, tail in results)
    assert finished_while_draining > 0  # the drain waited for streams that were running on it
    assert sorted(info.worker_id for info in pools.workers()) == ["context-0", "generation-1"]
    assert pools.count("generation") == 1
    served.wait_until_every_block_is_free(expected_workers=2)
