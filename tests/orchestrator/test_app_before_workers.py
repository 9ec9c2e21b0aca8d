"""What the app decides before a worker sees a request. A request that fails before its first
token gets its HTTP status, streamed or not: with no worker to route to, 503 with Retry-After (a
client backs off by status), not a 200 stream that carries the error as an event. A text too long
to fit the context is refused before it is tokenized. The cluster is real and empty; prompts are token ids, so the app
never asks its tokenizer for anything but the model's length."""
from __future__ import annotations

from starlette.testclient import TestClient

from tandem.orchestrator.app import AppState, create_app
from tandem.orchestrator.cluster import Cluster
from tandem.orchestrator.pipeline import Pipeline
from tandem.orchestrator.router import make_router


class _LengthOnly:
    """What the app reads of a tokenizer before it tokenizes: a text it would tokenize fails the
    test (500), as this stand-in cannot."""

    model, max_model_len, max_token_chars = "m", 2048, 4


async def _start() -> AppState:
    cluster = Cluster(block_size=16)  # every worker down: nothing to route to
    return AppState(Pipeline(cluster, make_router("kv_aware", 0)), cluster, _LengthOnly(), served_model_name="m")


async def _stop(state: AppState) -> None:
    await state.cluster.close()


def test_no_worker_is_503_with_retry_after_streamed_or_not() -> None:
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}
    with TestClient(create_app(_start, _stop)) as client:
        for stream in (False, True):
            reply = client.post("/v1/completions", json=body | {"stream": stream})
            assert reply.status_code == 503, reply.text
            assert reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["type"] == "server_error"
            assert "no worker can serve this request" in reply.json()["error"]["message"]
        assert client.get("/metrics").status_code == 200


def test_a_text_that_cannot_fit_is_refused_without_tokenizing_it() -> None:
    with TestClient(create_app(_start, _stop)) as client:
        reply = client.post("/v1/completions", json={"model": "m", "prompt": "x" * (2048 * 4 + 1)})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
        chat = [{"role": "user", "content": "y" * 5000}, {"role": "user", "content": "z" * 5000}]
        reply = client.post("/v1/chat/completions", json={"model": "m", "messages": chat})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
