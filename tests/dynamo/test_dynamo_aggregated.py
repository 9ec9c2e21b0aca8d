"""Two Tandem aggregated workers behind Dynamo's real OpenAI frontend in KV-router mode, on
loopback with file discovery: the answers equal Tandem's own greedy output, a repeated prompt
lands on the worker whose KV events announced its prefix, and a client that leaves mid-stream frees its blocks."""
from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("dynamo.llm")

from dynamo_processes import Deployment, deploy, tandem_greedy, tokenizer_of  # noqa: E402
from worker_rpc import pool_full, wait_for  # noqa: E402

from tandem.orchestrator.tokenizer import PromptTokenizer  # noqa: E402

MAX_TOKENS = 16
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def deployment(start_worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("dynamo-aggregated")
    with deploy(start_worker, folder, ["aggregated"] * 2, "kv", "--kv-cache-bytes", str(64 << 20)) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def tokenizer(deployment: Deployment) -> PromptTokenizer:
    return tokenizer_of(deployment.workers[0])


def test_chat_completion_equals_tandem_greedy_output(deployment: Deployment, tokenizer: PromptTokenizer) -> None:
    prompt_ids = tokenizer.apply_chat_template(QUESTION)
    expected_ids, expected_text = tandem_greedy(deployment.workers[0], prompt_ids, MAX_TOKENS)

    reply = deployment.client.chat.completions.create(
        model=deployment.model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected_text.strip()
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(expected_ids)

    stream = deployment.client.chat.completions.create(
        model=deployment.model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content


def test_streaming_completion_equals_tandem_greedy_output(deployment: Deployment, tokenizer: PromptTokenizer) -> None:
    prompt = "The three primary colours are"
    expected_ids, expected_text = tandem_greedy(deployment.workers[1], tokenizer.encode(prompt), MAX_TOKENS)
    stream = deployment.client.completions.create(
        model=deployment.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected_text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == (
        "length" if len(expected_ids) == MAX_TOKENS else "stop")


def test_requests_land_on_the_worker_that_holds_their_prefix(deployment: Deployment, tokenizer: PromptTokenizer) -> None:
    # Each prompt (ten blocks, sent by no other test) is first computed on one worker over Tandem's
    # own gRPC API, behind Dynamo's back: the router can only know where it is from the KV events.
    # Each worker counts the prompt tokens it computed; the one that served a request is the one
    # whose count grew, and the holder recomputes at most the last block.
    prompts = [" ".join(f"{fruit} number {i} is ripe." for i in range(24)) for fruit in ("Apple", "Plum")]
    for worker, prompt in zip(deployment.workers, prompts):
        tandem_greedy(worker, tokenizer.encode(prompt), 1)
    time.sleep(0.5)  # the events' way to the router: worker PUB, Dynamo's relay, its event plane

    for _ in range(2):
        for holder, prompt in enumerate(prompts):
            before = [worker.stats().num_prompt_tokens_computed for worker in deployment.workers]
            deployment.client.completions.create(model=deployment.model, prompt=prompt, max_tokens=2, temperature=0)
            grown = [w.stats().num_prompt_tokens_computed - b for w, b in zip(deployment.workers, before)]
            assert grown[1 - holder] == 0, f"prompt {holder} was routed away from the worker holding it: {grown}"
            assert 0 < grown[holder] <= 16, f"the holder recomputed more than the last block: {grown}"


def test_client_leaving_mid_stream_frees_the_request(deployment: Deployment) -> None:
    body = {"model": deployment.model, "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{deployment.frontend.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
    assert received  # the stream had begun before the client left
    for worker in deployment.workers:
        wait_for(lambda: worker.stats().num_running == 0 and pool_full(worker), 30, "the abandoned request to end")


def test_unsupported_sampling_is_a_clear_client_error(deployment: Deployment) -> None:
    reply = httpx.post(f"{deployment.frontend.url}/v1/completions", timeout=60, json={
        "model": deployment.model, "prompt": "Hello", "max_tokens": 4, "logprobs": 2})
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["message"] == "logprobs are not served through Dynamo yet"
    # ... and the workers keep serving.
    assert deployment.client.completions.create(model=deployment.model, prompt="Hello", max_tokens=2).choices
