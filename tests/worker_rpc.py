"""Client helpers shared by the tests that drive worker processes over gRPC, and the uvicorn
thread that serves the orchestrator app over them."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
import uvicorn

from tandem.proto import tandem_pb2 as pb

MAX_TOKENS = 24


def greedy(max_tokens: int = MAX_TOKENS) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def prefill(worker, request_id: str, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> pb.PrefillResponse:
    return worker.stub.Prefill(
        pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=greedy(max_tokens)), timeout=60
    )


def generate(worker, request_id: str, prompt_ids: list[int], reply: pb.PrefillResponse | None = None,
             max_tokens: int = MAX_TOKENS) -> list[pb.GenerateChunk]:
    """Generate, with the KV handle and first token of a Prefill reply when one is given."""
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=greedy(max_tokens))
    if reply is not None:
        request.kv_handle.CopyFrom(reply.kv_handle)
        request.first_token_id = reply.first_token_id
    return list(worker.stub.Generate(request, timeout=120))


def tokens_of(chunks: list[pb.GenerateChunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def run_disaggregated(pair, request_id: str, prompt_ids: list[int], max_tokens: int = MAX_TOKENS):
    """Prefill on the pair's context worker, Generate with its handle on the generation worker:
    (all tokens, the Prefill reply, the Generate chunks)."""
    context, generation = pair
    reply = prefill(context, request_id, prompt_ids, max_tokens)
    assert reply.HasField("kv_handle"), reply
    chunks = generate(generation, request_id, prompt_ids, reply, max_tokens)
    return [reply.first_token_id, *tokens_of(chunks)], reply, chunks


def free_port() -> int:
    """A port nothing listens on now (another process may take it before the caller binds it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def pool_full(worker) -> bool:
    stats = worker.stats()
    return stats.num_free_blocks == stats.num_total_blocks


class Server:
    """uvicorn on a free port, in a thread, stopped at the end."""

    def __init__(self, app, start_timeout_s: float = 60) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s  # the app's lifespan starts its workers
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def app_over_workers(workers, api_key: str | None, max_concurrent_requests: int = 256):
    """The REST app over already running worker processes (the last one hands out the tokenizer),
    wired on the server's own event loop exactly as `tandem serve` wires it, without Ray."""
    from tandem.orchestrator.app import AppState, create_app
    from tandem.orchestrator.cluster import Cluster, WorkerInfo
    from tandem.orchestrator.serve import app_state
    from tandem.orchestrator.serve_config import ServeConfig

    config = ServeConfig.model_validate({
        "served_model_name": "smollm2",
        "router": {"policy": "kv_aware", "local_prefill_max_tokens": 4, "max_retries": 1},
        "limits": {"max_concurrent_requests": max_concurrent_requests, "request_timeout_s": 120},
    })

    async def start() -> AppState:
        cluster = Cluster(block_size=16)
        for worker in workers:
            cluster.add(WorkerInfo.from_ready(worker.ready))
        return await app_state(cluster, workers[-1].ready["worker_id"], config, api_key)

    async def stop(state: AppState) -> None:
        await state.cluster.close()

    return create_app(start, stop)
