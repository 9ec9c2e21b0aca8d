"""A Tandem context worker and a Tandem generation worker registered with Dynamo as prefill and
decode, behind Dynamo's real frontend: Dynamo routes, Tandem moves the KV over NIXL. The answer
is token-identical to aggregated decoding, and the decode side really READ the prompt's blocks."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("dynamo.llm")

from dynamo_processes import Deployment, deploy, tandem_greedy, tokenizer_of  # noqa: E402
from worker_rpc import pool_full, wait_for  # noqa: E402

MAX_TOKENS = 16
BLOCK_SIZE = 16
BLOCK_BYTES = 2 * 30 * 3 * 64 * 4 * BLOCK_SIZE  # K and V, SmolLM2-135M's 30 layers x 3 KV heads x 64 dims, fp32


@pytest.fixture(scope="module")
def deployment(start_worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("dynamo-disaggregated")
    # The model is listed only once both halves are registered.
    with deploy(start_worker, folder, ["generation", "context"], "round-robin",
                "--kv-cache-bytes", str(64 << 20), "--lease-seconds", "10") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def generation(deployment: Deployment):
    return deployment.workers[0]


def test_answer_is_token_identical_to_aggregated_and_kv_moved_over_nixl(deployment: Deployment, generation) -> None:
    prompt = "Write one sentence about the sea, the sky and the mountains of Norway:"
    before = generation.stats()
    reply = deployment.client.completions.create(
        model=deployment.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    after = generation.stats()

    num_prompt_tokens = reply.usage.prompt_tokens
    blocks = -(-num_prompt_tokens // BLOCK_SIZE)
    moved = after.num_transferred_blocks - before.num_transferred_blocks
    assert moved == blocks, f"expected the prompt's {blocks} blocks to be READ, got {moved}"
    assert after.num_transferred_bytes - before.num_transferred_bytes == blocks * BLOCK_BYTES
    assert after.num_prompt_tokens_computed == before.num_prompt_tokens_computed  # decode computed no prompt

    # The reference: the same prompt decoded by one Tandem worker alone (the generation worker,
    # which now serves it aggregated from its own cache).
    prompt_ids = tokenizer_of(generation).encode(prompt)
    assert len(prompt_ids) == num_prompt_tokens
    expected_ids, expected_text = tandem_greedy(generation, prompt_ids, MAX_TOKENS)
    assert reply.choices[0].text == expected_text
    assert reply.usage.completion_tokens == len(expected_ids)


def test_streamed_chat_through_prefill_and_decode(deployment: Deployment) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = deployment.client.chat.completions.create(
        model=deployment.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    stream = deployment.client.chat.completions.create(
        model=deployment.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    assert reply.choices[0].message.content


def test_leases_and_blocks_come_back_on_both_sides(deployment: Deployment) -> None:
    deployment.client.completions.create(model=deployment.model, prompt="Hello there", max_tokens=1, temperature=0)
    for worker in deployment.workers:
        wait_for(lambda: worker.stats().num_leases == 0 and pool_full(worker), 15, "leases and blocks to come back")
