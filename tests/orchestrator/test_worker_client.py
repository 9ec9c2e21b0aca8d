"""The orchestrator's gRPC client against real tiny worker processes: tokens, transfer reports,
and errors that say whether another worker may succeed."""
from __future__ import annotations

import asyncio

import pytest
import torch

from tandem.orchestrator.worker_client import WorkerCallError, WorkerClient

PROMPT = [11, 140, 23, 64, 3, 98, 131, 45, 7, 88]
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "stop": ()}


@pytest.fixture(scope="module")
def pair(start_worker, tiny_llama):
    args = ["--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32", "--block-size", "4",
            "--kv-cache-bytes", str(64 * 2048)]
    return start_worker.all(start_worker.launch("context", *args), start_worker.launch("generation", *args))


def test_prefill_then_generate_gives_transformers_tokens(pair, tiny_llama) -> None:
    context, generation = pair

    async def run() -> tuple[list[int], list]:
        clients = WorkerClient(context.address), WorkerClient(generation.address)
        try:
            reply = await clients[0].prefill("client-1", PROMPT, GREEDY)
            assert reply.handle is not None and reply.finish_reason is None and reply.num_prompt_tokens == len(PROMPT)
            deltas = [d async for d in clients[1].generate(
                "client-1", PROMPT, GREEDY, handle=reply.handle, first_token_id=reply.first_token_id, timeout_s=30)]
            return [reply.first_token_id] + [t for d in deltas for t in d.token_ids], deltas
        finally:
            for client in clients:
                await client.close()

    tokens, deltas = asyncio.run(run())
    with torch.inference_mode():
        expected = tiny_llama[1].generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert tokens == expected[0, len(PROMPT):].tolist()
    assert deltas[0].transfer is not None and deltas[0].transfer.num_blocks == 3
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 8


def test_errors_say_whether_another_worker_may_succeed(pair) -> None:
    context, generation = pair

    async def failure(address: str, call) -> WorkerCallError:
        client = WorkerClient(address, timeout_s=5)
        try:
            await call(client)
        except WorkerCallError as error:
            return error
        finally:
            await client.close()
        pytest.fail("the call succeeded")

    async def stale_handle(client: WorkerClient) -> None:
        prefill_client = WorkerClient(context.address)
        reply = await prefill_client.prefill("client-stale", PROMPT, GREEDY)
        await prefill_client.release(reply.handle)
        await prefill_client.close()
        reply.handle.epoch += 1
        async for _ in client.generate("client-stale", PROMPT, GREEDY, handle=reply.handle,
                                       first_token_id=reply.first_token_id, timeout_s=10):
            pass

    async def run() -> dict[str, WorkerCallError]:
        return {
            "bad params": await failure(context.address, lambda c: c.prefill("x", PROMPT, {"max_tokens": 0})),
            "wrong role": await failure(generation.address, lambda c: c.prefill("x", PROMPT, GREEDY)),
            "stale epoch": await failure(generation.address, stale_handle),
            "no worker": await failure("127.0.0.1:1", lambda c: c.stats()),
        }

    errors = asyncio.run(run())
    assert (errors["bad params"].code, errors["bad params"].retriable) == ("INVALID_ARGUMENT", False)
    assert "max_tokens" in errors["bad params"].message
    assert (errors["wrong role"].code, errors["wrong role"].retriable) == ("FAILED_PRECONDITION", False)
    assert (errors["stale epoch"].code, errors["stale epoch"].retriable) == ("FAILED_PRECONDITION", True)
    assert (errors["no worker"].code, errors["no worker"].retriable) == ("UNAVAILABLE", True)
