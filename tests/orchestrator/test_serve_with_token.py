"""`tandem serve` with a cluster token (security.cluster_token_file): the orchestrator's calls,
and the generation worker's calls to the context worker, carry it; a call without it is refused
and counted by the worker. Real Ray, real workers of the embedded model, one of each role."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ray_serving import Served, serve_on_ray
from tandem.orchestrator.worker_client import WorkerCallError, WorkerClient

KV_CACHE_BYTES = 64 * 737_280  # 64 blocks of 16 tokens of SmolLM2 in float32


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tandem.orchestrator.serve_config import ServeConfig

    token_file = Path(tmp_path_factory.mktemp("token")) / "cluster-token"
    token_file.write_text("a-long-random-cluster-token\n")
    pool = {"count": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": KV_CACHE_BYTES}
    config = ServeConfig.model_validate({
        "pools": {"context": pool, "generation": pool},
        "router": {"local_prefill_max_tokens": 0},  # every prompt goes through the context worker
        "security": {"cluster_token_file": str(token_file)},
    })
    with serve_on_ray(config) as served:
        yield served


def test_requests_flow_with_the_token_and_calls_without_it_are_refused(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=180)
    reply = client.completions.create(model=client.models.list().data[0].id, prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8
    stats = served.worker_stats()
    assert sum(s.num_transferred_blocks for s in stats.values()) > 0  # generation READ from context: peers authenticated

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
    served.wait_until_every_block_is_free(2)
