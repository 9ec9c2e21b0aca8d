"""The worker gRPC API fed random messages: valid Prefill, Generate, Release and Abort messages
mutated at random (fixed seed), and bytes that are not a protobuf at all. Every reply is OK or one
of the documented statuses, never INTERNAL and never late, and afterwards nothing is lost (see
test_grpc_fuzz.py for the statuses of each hand-written case)."""
from __future__ import annotations

import concurrent.futures
import math
import random
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from tandem.proto import tandem_pb2 as pb
from worker_rpc import greedy, prefill
from grpc_fuzz_support import (
    NUM_BLOCKS,
    RPC_TIMEOUT_S,
    MAX_MODEL_LEN,
    VOCAB_SIZE,
    REFUSED_ADDRESS,
    OK,
    INVALID,
    PRECONDITION,
    NOT_FOUND,
    UNAVAILABLE,
    generate_request,
    with_changes,
    release,
    assert_nothing_lost,
)


FUZZ_ITERATIONS = 200
FUZZ_SEED = 20240917
ALLOWED = {OK, INVALID, PRECONDITION, NOT_FOUND, UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
FLOATS = [0.0, -1.0, 0.5, 1.0, 2.5, 101.0, math.nan, math.inf, -math.inf]
PARAM_VALUES = {  # field -> values, valid and not
    "max_tokens": [0, 1, 3, 2**32 - 1], "temperature": FLOATS, "top_p": FLOATS, "min_p": FLOATS,
    "presence_penalty": FLOATS, "frequency_penalty": FLOATS, "repetition_penalty": FLOATS,
    "top_k": [-5, 0, 1, 2**31 - 1], "seed": [0, 2**63, 2**64 - 1], "logprobs": [0, 20, 21, 2**32 - 1],
    "ignore_eos": [False], "skip_special_tokens": [False, True],
}


class Fuzzer:
    """Valid Prefill, Generate, Release and Abort messages, each mutated in 0 to 3 random ways:
    field values out of range, prompts that cannot be served, handles with one field changed or
    used before (replays), the wrong worker, request ids that are empty or shared."""

    def __init__(self, rng: random.Random, fuzz_pair) -> None:
        self.rng = rng
        self.context, self.generation = fuzz_pair
        self.live: list[tuple[pb.KVHandle, int, list[int]]] = []  # (handle, first token, prompt), not yet used
        self.used: list[pb.KVHandle] = []  # read, released or refused handles: replays
        self.count = 0
        self.lock = threading.Lock()  # two calls at once may both keep a handle

    def message(self, request_id: str | None = None) -> tuple[str, Callable[[], object]]:
        """One call to make: (kind, call)."""
        rng = self.rng
        self.count += 1
        kind = rng.choice(["prefill", "generate", "generate-handle", "generate-handle", "release", "abort"])
        mutations = rng.choice([0, 0, 1, 1, 2, 3])
        request_id = request_id or f"fuzz-{self.count}"
        if kind == "release":
            handle = self.mutated_handle(rng.choice(self.used) if self.used and rng.random() < 0.5 else self.take_live()[0], mutations)
            target = self.generation if rng.random() < 0.1 else self.context
            return kind, lambda: target.stub.Release(pb.ReleaseRequest(handle=handle), timeout=RPC_TIMEOUT_S)
        if kind == "abort":
            request_id = rng.choice(["", "fuzz-unknown", f"fuzz-{rng.randrange(self.count)}"])
            target = rng.choice([self.context, self.generation])
            return kind, lambda: target.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=RPC_TIMEOUT_S)
        if kind == "prefill":
            request = pb.PrefillRequest(request_id=request_id, prompt_token_ids=self.prompt(), params=greedy(rng.choice([1, 4])))
            self.mutate(request, mutations)
            target = self.generation if rng.random() < 0.1 else self.context
            return kind, lambda: self.keep_handle(target.stub.Prefill(request, timeout=RPC_TIMEOUT_S), request)
        request = generate_request(request_id, self.prompt(), params=greedy(rng.choice([2, 6])))
        if kind == "generate-handle":  # mostly the handle is mutated, and the request stays valid
            handle, first, prompt = self.take_live()
            request.kv_handle.CopyFrom(self.mutated_handle(handle, mutations))
            request.first_token_id = first
            request.prompt_token_ids[:] = prompt
            if rng.random() < 0.1:
                request.ClearField("first_token_id")
            elif rng.random() < 0.1:
                request.first_token_id = rng.choice([VOCAB_SIZE, 2**32 - 1, rng.randrange(VOCAB_SIZE)])
            self.used.append(handle)
            mutations = rng.choice([0, 0, 0, 1])
        self.mutate(request, mutations)
        target = self.context if rng.random() < 0.1 else self.generation
        return kind, lambda: target.stub.Generate(request, timeout=RPC_TIMEOUT_S)

    def prompt(self) -> list[int]:
        return [self.rng.randrange(VOCAB_SIZE) for _ in range(self.rng.randrange(1, 21))]

    def mutate(self, request: pb.PrefillRequest | pb.GenerateRequest, count: int) -> None:
        rng = self.rng
        for _ in range(count):
            what = rng.choice(["request_id", "prompt", "prompt", "params", "params", "params"])
            if what == "request_id":
                request.request_id = rng.choice(["", "fuzz-shared", "\u00e9\u0000" * 3, "x" * 1000])
            elif what == "prompt":
                prompt = list(request.prompt_token_ids)
                request.prompt_token_ids[:] = rng.choice([
                    [], prompt + [rng.choice([VOCAB_SIZE, 2**32 - 1])], [7] * rng.choice([MAX_MODEL_LEN - 1, MAX_MODEL_LEN, 400]),
                    prompt[:-1] or [1], prompt * 2])
            else:
                name = rng.choice(list(PARAM_VALUES))
                setattr(request.params, name, rng.choice(PARAM_VALUES[name]))
                if rng.random() < 0.2:
                    request.params.stop.append(rng.choice(["", "a", "\n"]))
                if rng.random() < 0.2:
                    request.params.stop_token_ids.append(rng.choice([0, VOCAB_SIZE, 2**32 - 1]))

    def take_live(self) -> tuple[pb.KVHandle, int, list[int]]:
        """A handle no one used yet; a fresh Prefill when there is none."""
        if not self.live:
            prompt = self.prompt()
            reply = prefill(self.context, f"fuzz-{self.count}-base", prompt, max_tokens=4)
            return reply.kv_handle, reply.first_token_id, prompt
        return self.live.pop(self.rng.randrange(len(self.live)))

    def mutated_handle(self, handle: pb.KVHandle, count: int) -> pb.KVHandle:
        rng = self.rng
        mutated = with_changes(handle)
        for _ in range(count):
            blocks = list(handle.block_ids)
            name, value = rng.choice([
                ("handle_id", rng.choice(["x", handle.handle_id + "1", handle.handle_id[:-1]])),
                ("worker_id", rng.choice(["someone", self.generation.ready["worker_id"]])),
                ("epoch", rng.choice([0, handle.epoch - 1, handle.epoch + 1, 2**64 - 1])),
                ("address", rng.choice([REFUSED_ADDRESS, self.generation.address, "not an address"])),
                ("block_ids", rng.choice([[], blocks[::-1], [rng.randrange(NUM_BLOCKS) for _ in blocks],
                                          blocks + blocks[-1:], [2**32 - 1] * len(blocks)])),
                ("num_tokens", rng.choice([0, handle.num_tokens + 1, 2**32 - 1])),
                ("lease_deadline_unix", rng.choice([0.0, time.time() - 1, math.nan, math.inf, 1e300])),
                ("mode", rng.choice([pb.TRANSFER_MODE_PUSH, 5])),
                ("staging_offset", rng.choice([0, 2**32 - 1])),
                ("agent_name", rng.choice(["", "someone#1"])),
            ])
            mutated = with_changes(mutated, **{name: value})
        return mutated

    def keep_handle(self, reply: pb.PrefillResponse, request: pb.PrefillRequest) -> pb.PrefillResponse:
        if not reply.HasField("kv_handle"):
            return reply
        with self.lock:
            self.live.append((reply.kv_handle, reply.first_token_id, list(request.prompt_token_ids)))
            old = self.live.pop(0)[0] if len(self.live) > 4 else None  # keep room in the context's cache
        if old is not None:
            release(self.context, old)
            self.used.append(old)
        return reply


def outcome(kind: str, call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if kind.startswith("generate"):
            list(result)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return OK, ""


def test_random_messages_get_documented_statuses_and_lose_nothing(fuzz_pair) -> None:
    """Every reply to a mutated Prefill, Generate, Release or Abort is OK or a documented
    non-INTERNAL status with a message, each well within its deadline; one message in ten goes
    out together with a second under the same request id. Afterwards both workers hold nothing
    (leases of refused handles expire) and serve a normal request."""
    rng = random.Random(FUZZ_SEED)
    fuzzer = Fuzzer(rng, fuzz_pair)
    seen: dict[tuple[str, grpc.StatusCode], int] = {}
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        for i in range(FUZZ_ITERATIONS):
            messages = [fuzzer.message()]
            if rng.random() < 0.1:
                messages = [fuzzer.message(f"fuzz-twins-{i}"), fuzzer.message(f"fuzz-twins-{i}")]
            outcomes = executor.map(lambda message: outcome(*message), messages)
            for (kind, _), (code, details) in zip(messages, outcomes):
                assert code in ALLOWED, (i, kind, code, details)
                assert code == OK or details, (i, kind, code)
                seen[kind, code] = seen.get((kind, code), 0) + 1
    for kind in ("prefill", "generate", "generate-handle", "release"):  # the fuzz reached past the checks
        assert seen.get((kind, OK), 0) >= 5 and sum(n for (k, _), n in seen.items() if k == kind) > seen[kind, OK], kind
    assert {code for _, code in seen} >= {INVALID, PRECONDITION}, seen
    assert_nothing_lost(fuzz_pair)


@pytest.mark.parametrize("method", ["Prefill", "Generate", "Release", "Abort", "Stats", "GetModelInfo"])
def test_bytes_that_are_not_a_protobuf_leave_the_worker_serving(fuzz_pair, method) -> None:
    """gRPC's own deserializer refuses them (grpcio answers UNKNOWN, naming the DecodeError), or
    they parse as some message that the worker answers like any other; either way at once, and
    the worker serves on."""
    for worker in fuzz_pair:
        path = f"/tandem.v1.Worker/{method}"
        call = (worker.channel.unary_stream if method == "Generate" else worker.channel.unary_unary)(path)
        for payload in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05\x01"):
            try:
                result = call(payload, timeout=RPC_TIMEOUT_S)
                if method == "Generate":
                    list(result)
            except grpc.RpcError as error:
                assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (method, payload)
        assert worker.process.poll() is None
    assert_nothing_lost(fuzz_pair, timeout=2.0)
