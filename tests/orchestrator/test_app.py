"""The REST endpoint in a real uvicorn over real SmolLM2 worker processes (context + generation),
driven by the official openai client: greedy text equals the offline LLM API's, streamed or not;
32 concurrent requests finish; bad requests get OpenAI-shaped 4xx answers; /metrics parses."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.workers.sampling_params import SamplingParams
from worker_rpc import Server, app_over_workers

KV_CACHE_BYTES = 96 * 737_280  # 96 blocks of 16 tokens of SmolLM2 in float32
PROMPT = "The capital of France is"
API_KEY = "sk-test"


@pytest.fixture(scope="module")
def workers(start_worker):
    args = ["--kv-cache-bytes", str(KV_CACHE_BYTES), "--dtype", "float32", "--device", "cpu"]
    return start_worker.all(start_worker.launch("context", *args), start_worker.launch("generation", *args))


@pytest.fixture(scope="module")
def server(workers):
    server = Server(app_over_workers(workers, API_KEY, max_concurrent_requests=48))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(make_llm):
    return make_llm()


def test_completion_streamed_or_not_equals_the_offline_api(client, offline) -> None:
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=24))[0]
    reply = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == expected.num_prompt_tokens and reply.usage.completion_tokens == 24
    stream = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-2].choices[0].finish_reason == "length"


def test_chat_streamed_equals_not_streamed_and_the_offline_api(client, offline) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    prompt = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = offline.generate(prompt, SamplingParams(max_tokens=16))[0]
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    assert reply.choices[0].message.content == streamed == expected.text


def test_32_concurrent_requests_all_finish(server) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as aclient:
            replies = await asyncio.gather(*(
                aclient.completions.create(model="smollm2", prompt=f"Count to {i}:", max_tokens=8, temperature=0)
                for i in range(32)
            ))
        return [r.choices[0].finish_reason for r in replies]

    assert asyncio.run(run()) == ["length"] * 32


def test_streams_over_the_admission_limit_get_429_with_retry_after(server) -> None:
    """A stream holds its admission slot from the moment it is accepted, not from its first byte:
    60 streams against a limit of 48 leave exactly 12 refused, and all slots come back."""
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True,
            "ignore_eos": True}

    async def one(http: httpx.AsyncClient) -> tuple[int, str | None, str]:
        async with http.stream("POST", f"{server.url}/v1/completions", json=body) as reply:
            text = (await reply.aread()).decode()
            return reply.status_code, reply.headers.get("retry-after"), text

    async def run() -> list[tuple[int, str | None, str]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(60)))

    replies = asyncio.run(run())
    refused = [r for r in replies if r[0] == 429]
    served = [r for r in replies if r[0] == 200]
    assert len(refused) == 12 and len(served) == 48, [r[0] for r in replies]
    assert all(retry_after for _, retry_after, _ in refused)
    assert all(text.rstrip().endswith("data: [DONE]") and '"error"' not in text for _, _, text in served)
    follow_up = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert follow_up.status_code == 200  # every slot came back


@pytest.mark.parametrize("body, status, param", [
    ({"model": "smollm2", "prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"model": "smollm2", "prompt": PROMPT, "n": 2}, 400, "n"),
    ({"model": "nope", "prompt": PROMPT}, 404, None),
    ({"model": "smollm2", "prompt": "word " * 3000}, 400, "prompt"),
    ({"model": "smollm2", "prompt": [10**6]}, 400, None),
])
def test_bad_requests_get_openai_errors_and_harm_nothing(server, client, body, status, param) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and (param is None or error["param"] == param)
    assert client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_malformed_json_missing_key_and_health_metrics(server) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=auth)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    for wrong in ("Bearer sk-wrong", "Bearer ключ".encode()):  # a non-ASCII header is refused, not a 500
        refused = httpx.get(f"{server.url}/v1/models", headers={"Authorization": wrong})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", headers=auth).json()["data"][0]["id"] == "smollm2"
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and json.loads(health.text)["status"] == "ok"
    transfer = health.json()["kv_transfer"]  # earlier tests handed KV off: the path is known good
    assert transfer["status"] == "ok" and [path["ok"] for path in transfer["paths"].values()] == [True]
    families = {f.name for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", headers=auth).text)}
    assert {"tandem_time_to_first_token_seconds", "tandem_kv_transfer_bytes", "tandem_worker_kv_blocks_used",
            "tandem_worker_leases_expired", "tandem_queue_seconds", "tandem_first_decode_step_seconds"} <= families


def test_a_client_that_disconnects_mid_stream_frees_the_blocks_on_both_workers(server, workers) -> None:
    body = {"model": "smollm2", "prompt": PROMPT * 8, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as reply:
        events = reply.iter_lines()
        assert next(line for line in events if line.startswith("data: "))  # tokens are flowing
    # Closing the stream cancels the pipeline, whose worker calls end; the workers abort.
    deadline = time.monotonic() + 20
    while True:
        stats = [worker.stats() for worker in workers]
        if all(s.num_running == 0 and s.num_leases == 0 and s.num_free_blocks == s.num_total_blocks for s in stats):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
