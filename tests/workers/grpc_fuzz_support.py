"""What the worker gRPC fuzz tests share: one context and one generation worker process of a tiny
random Llama per test module (3 s leases, so a refused handle is released or expires quickly), the
statuses of docs/architecture.md, message builders, and the check that nothing was lost."""
from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from tandem.proto import tandem_pb2 as pb
from worker_rpc import greedy, pool_full, run_disaggregated, wait_for

BLOCK_SIZE = 4
NUM_BLOCKS = 64
KV_BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # layers, K and V, tokens, kv heads, head dim, float32
LEASE_SECONDS = 3.0
PEER_TIMEOUT_S = 5.0  # WorkerConfig.peer_timeout_s
RPC_TIMEOUT_S = 30.0  # no call may come near it: a reply that late is a hang
PROMPT = [17, 42, 99, 5, 120, 33, 8, 77, 150, 61]  # two full blocks and a part: a READ always moves one
MAX_MODEL_LEN = 256  # the tiny Llama's max_position_embeddings (the cache holds 64 * 4 tokens too)
VOCAB_SIZE = 160
REFUSED_ADDRESS = "127.0.0.1:1"  # nothing listens: connection refused
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def start_pair(start_worker, tiny_llama) -> tuple:
    """(context, generation): the fuzz_pair fixture of tests/workers/conftest.py."""
    common = ["--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
              "--kv-cache-bytes", str(NUM_BLOCKS * KV_BYTES_PER_BLOCK), "--lease-seconds", str(LEASE_SECONDS)]
    return start_worker.all(start_worker.launch("context", *common),
                            start_worker.launch("generation", *common, "--transfer-timeout", "3"))


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a call ends with; a stream is read to its end."""
    try:
        result = call()
        if hasattr(result, "__next__"):  # a Generate stream
            list(result)
    except grpc.RpcError as error:
        return error.code()
    return OK


def error_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__next__"):  # a Generate stream
            list(result)
    return raised.value


def generate_request(request_id: str, prompt: list[int], handle: pb.KVHandle | None = None,
                     first_token_id: int | None = None, params: pb.SamplingParams | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params or greedy(8))
    if handle is not None:
        request.kv_handle.CopyFrom(handle)
    if first_token_id is not None:
        request.first_token_id = first_token_id
    return request


def with_changes(handle: pb.KVHandle, **fields) -> pb.KVHandle:
    changed = pb.KVHandle()
    changed.CopyFrom(handle)
    for name, value in fields.items():
        if name == "block_ids":
            del changed.block_ids[:]
            changed.block_ids.extend(value)
        else:
            setattr(changed, name, value)
    return changed


def release(worker, handle: pb.KVHandle) -> bool:
    return worker.stub.Release(pb.ReleaseRequest(handle=handle), timeout=RPC_TIMEOUT_S).released


def assert_nothing_lost(pair, timeout: float = LEASE_SECONDS + 5) -> None:
    """Both pools full, no lease, no transfer, and a normal request served end to end."""
    context, generation = pair
    for worker in pair:
        wait_for(lambda: (s := worker.stats()).num_leases == 0 and s.num_transferring == 0
                 and s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0,
                 timeout, f"{worker.ready['role']} worker to hold nothing")
    tokens, _, _ = run_disaggregated(pair, f"after-{time.monotonic_ns()}", PROMPT, max_tokens=4)
    assert len(tokens) == 4
    wait_for(lambda: pool_full(context) and context.stats().num_leases == 0, 5.0, "the READ's lease to end")
