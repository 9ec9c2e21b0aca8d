"""The worker gRPC API fed malformed and out-of-order messages, between one context and one
generation worker process of a tiny random Llama: each refusal has one precise status, and
nothing is lost (every block back in both pools, no lease left, a normal request still served).

The statuses are those of docs/architecture.md ("Status codes"):

- INVALID_ARGUMENT: a request that can never be served as sent: no request id, an empty prompt,
  prompt ids outside the vocabulary, a prompt of max_model_len tokens or more, sampling values out
  of range (max_tokens 0, temperature -1, logprobs 50), a kv_handle without first_token_id or with
  one outside the vocabulary, a handle whose tokens or blocks do not match the prompt or what its
  owner issued under that id, a non-finite lease deadline, an unknown transfer mode, a request id
  already in flight on the worker.
- FAILED_PRECONDITION: the wrong role (Prefill on a generation worker, Generate on a context
  worker); a handle or Release of another epoch of the owner, or naming another worker than the
  one at its address; a lease that ended: its deadline passed, or it was released or read before
  (a replayed handle).
- NOT_FOUND: a handle its owner never issued (Release, or Generate with it).
- UNAVAILABLE (retriable): the handle's owner cannot be reached, found out within the peer
  timeout (5 s) or the lease's time left, whichever is shorter.

top_p 0 means 1.0 (proto3 cannot tell unset from zero): OK. Release of a handle whose lease has
already ended answers OK with released=False. Abort of an unknown request answers found=False.
Bytes that are not a protobuf are refused by gRPC's own deserializer; the worker serves on.

The workers lease KV for 3 s, so a refused handle is either released here or expires quickly.
"""
from __future__ import annotations

import concurrent.futures
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from tandem.proto import tandem_pb2 as pb
from worker_rpc import greedy, pool_full, prefill, run_disaggregated, tokens_of, wait_for

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


@pytest.fixture(scope="module")
def pair(start_worker, tiny_llama):
    common = ["--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
              "--kv-cache-bytes", str(NUM_BLOCKS * KV_BYTES_PER_BLOCK), "--lease-seconds", str(LEASE_SECONDS)]
    context = start_worker("context", *common)
    generation = start_worker("generation", *common, "--transfer-timeout", "3")
    return context, generation


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


# -- handles that name no live lease ------------------------------------------------------------


def test_generate_with_a_never_issued_handle_is_not_found(pair) -> None:
    """NOT_FOUND: the owner never issued this handle id, whatever the rest of the handle says
    (here: a live handle's blocks, worker and epoch, so only the owner can tell)."""
    context, generation = pair
    reply = prefill(context, "never-issued", PROMPT)
    forged = with_changes(reply.kv_handle, handle_id=reply.kv_handle.handle_id + "0000")
    error = error_of(lambda: generation.stub.Generate(
        generate_request("never-issued", PROMPT, forged, reply.first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == NOT_FOUND, error.details()
    assert forged.handle_id in error.details()
    assert release(context, reply.kv_handle)  # the real lease was left alone
    assert_nothing_lost(pair)


@pytest.mark.parametrize("ended_by", ["release", "read"])
def test_replayed_handle_is_refused_as_an_ended_lease(pair, ended_by) -> None:
    """FAILED_PRECONDITION: a handle whose lease ended (released by the router, or acknowledged by
    a READ that served it) names blocks that may hold another prompt now. With ended_by "read" the
    generation worker holds all the prompt's full blocks itself, and still refuses."""
    context, generation = pair
    prompt = [9, 8, 7, 6, 5, 4, 3, 2] if ended_by == "read" else [3, 1, 4, 1, 5, 9, 2, 6, 5]
    reply = prefill(context, f"replay-{ended_by}", prompt)
    if ended_by == "release":
        assert release(context, reply.kv_handle)
    else:
        chunks = list(generation.stub.Generate(
            generate_request(f"replay-{ended_by}", prompt, reply.kv_handle, reply.first_token_id), timeout=RPC_TIMEOUT_S))
        assert len(tokens_of(chunks)) == 7
        wait_for(lambda: context.stats().num_leases == 0, 5.0, "the READ to end the lease")
    error = error_of(lambda: generation.stub.Generate(
        generate_request(f"replay-{ended_by}-again", prompt, reply.kv_handle, reply.first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == PRECONDITION, error.details()
    assert "lease" in error.details()
    assert not release(context, reply.kv_handle)
    assert_nothing_lost(pair)


def test_handle_whose_lease_deadline_passed_is_refused(pair) -> None:
    """FAILED_PRECONDITION, at once: the deadline in the handle has passed (the owner's lease may
    still run: only the reader's clock says so). Nothing moves; the router's Release still works."""
    context, generation = pair
    reply = prefill(context, "deadline-passed", PROMPT)
    late = with_changes(reply.kv_handle, lease_deadline_unix=time.time() - 1)
    error = error_of(lambda: generation.stub.Generate(
        generate_request("deadline-passed", PROMPT, late, reply.first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == PRECONDITION and "lease" in error.details(), error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(pair)


# -- handles that do not match the prompt or what the owner issued ----------------------------


def bad_handles(handle: pb.KVHandle) -> dict[str, pb.KVHandle]:
    blocks = list(handle.block_ids)
    return {
        "one token too many": with_changes(handle, num_tokens=handle.num_tokens + 1),
        "one token too few": with_changes(handle, num_tokens=handle.num_tokens - 4),
        "one block too few": with_changes(handle, block_ids=blocks[:-1]),
        "other blocks": with_changes(handle, block_ids=[(b + 7) % NUM_BLOCKS for b in blocks]),
        "blocks in another order": with_changes(handle, block_ids=blocks[::-1]),
        "a block twice": with_changes(handle, block_ids=[blocks[0]] * len(blocks)),
        "a block past the owner's cache": with_changes(handle, block_ids=blocks[:-1] + [NUM_BLOCKS]),
        "a block id of 2**32 - 1": with_changes(handle, block_ids=blocks[:-1] + [2**32 - 1]),
        "a staging offset the owner never gave": with_changes(handle, staging_offset=3),
        "a lease deadline of NaN": with_changes(handle, lease_deadline_unix=math.nan),
        "a push handle": with_changes(handle, mode=pb.TRANSFER_MODE_PUSH),
        "an unknown transfer mode": with_changes(handle, mode=7),
        "no address": with_changes(handle, address=""),
    }


def test_handle_that_does_not_match_the_prompt_or_its_lease_is_invalid(pair) -> None:
    """INVALID_ARGUMENT for each handle in bad_handles: its token or block count is not the
    prompt's, its blocks are not the ones the owner leased under that id (other ids, another
    order, out of the owner's range), or a field no owner writes. The real lease survives them all."""
    context, generation = pair
    reply = prefill(context, "bad-handles", PROMPT)
    for name, handle in bad_handles(reply.kv_handle).items():
        error = error_of(lambda: generation.stub.Generate(
            generate_request(f"bad-handle-{name}", PROMPT, handle, reply.first_token_id), timeout=RPC_TIMEOUT_S))
        assert error.code() == INVALID, (name, error.code(), error.details())
        assert pool_full(generation), name
    assert context.stats().num_leases == 1
    assert release(context, reply.kv_handle)
    assert_nothing_lost(pair)


@pytest.mark.parametrize("epoch_change", [-1, +1])
def test_handle_of_another_epoch_is_refused(pair, epoch_change) -> None:
    """FAILED_PRECONDITION for Generate and for Release: the owner restarted (older handle) or the
    handle is not from its present epoch; its blocks are not these."""
    context, generation = pair
    reply = prefill(context, f"epoch{epoch_change:+d}", PROMPT)
    other = with_changes(reply.kv_handle, epoch=reply.kv_handle.epoch + epoch_change)
    for call in (lambda: generation.stub.Generate(generate_request(f"epoch{epoch_change:+d}", PROMPT, other,
                                                                   reply.first_token_id), timeout=RPC_TIMEOUT_S),
                 lambda: context.stub.Release(pb.ReleaseRequest(handle=other), timeout=RPC_TIMEOUT_S)):
        error = error_of(call)
        assert error.code() == PRECONDITION and "epoch" in error.details(), error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(pair)


def test_handle_naming_another_worker_at_the_owners_address_is_refused(pair) -> None:
    """FAILED_PRECONDITION: the address answers as another worker (it was replaced there); the
    same for a handle naming the generation worker itself at its own address."""
    context, generation = pair
    reply = prefill(context, "other-worker", PROMPT)
    for handle in (with_changes(reply.kv_handle, worker_id="context-nobody"),
                   with_changes(reply.kv_handle, address=generation.address)):
        error = error_of(lambda: generation.stub.Generate(
            generate_request("other-worker", PROMPT, handle, reply.first_token_id), timeout=RPC_TIMEOUT_S))
        assert error.code() == PRECONDITION, error.details()
    error = error_of(lambda: context.stub.Release(
        pb.ReleaseRequest(handle=with_changes(reply.kv_handle, worker_id="context-nobody")), timeout=RPC_TIMEOUT_S))
    assert error.code() == PRECONDITION, error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(pair)


@pytest.fixture(scope="module")
def silent_address() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield f"127.0.0.1:{silent.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_handle_whose_owner_is_unreachable_fails_in_bounded_time(pair, silent_address, kind) -> None:
    """UNAVAILABLE (retriable), in bounded time: nothing listens at the handle's address (at once),
    or something listens and never answers (after the peer timeout, 5 s, or sooner when the lease
    ends first: here after its 3 s less the reader's 0.5 s margin)."""
    context, generation = pair
    address = REFUSED_ADDRESS if kind == "refused" else silent_address
    reply = prefill(context, f"unreachable-{address}", PROMPT)
    lost = with_changes(reply.kv_handle, address=address, worker_id="context-elsewhere")
    start = time.monotonic()
    error = error_of(lambda: generation.stub.Generate(
        generate_request(f"unreachable-{address}", PROMPT, lost, reply.first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == UNAVAILABLE, error.details()
    assert dict(error.trailing_metadata()).get("tandem-retriable") == "true"
    assert time.monotonic() - start < min(PEER_TIMEOUT_S, LEASE_SECONDS) + 2
    release(context, reply.kv_handle)  # it may have expired already
    assert_nothing_lost(pair)


# -- Release and Abort ----------------------------------------------------------------------------


def test_release_twice_never_issued_and_of_another_epoch(pair) -> None:
    """Release: released=True once, then released=False (harmless); NOT_FOUND for an id never
    issued; FAILED_PRECONDITION for another epoch; INVALID_ARGUMENT for a handle without an id."""
    context, _ = pair
    reply = prefill(context, "release-twice", PROMPT)
    handle = reply.kv_handle
    assert release(context, handle) and not release(context, handle)
    assert error_of(lambda: release(context, with_changes(handle, handle_id=f"{handle.worker_id}/{handle.epoch}/999999"))
                    ).code() == NOT_FOUND
    assert error_of(lambda: release(context, with_changes(handle, epoch=handle.epoch + 1))).code() == PRECONDITION
    assert error_of(lambda: release(context, pb.KVHandle())).code() == INVALID
    assert_nothing_lost(pair)


def test_abort_of_an_unknown_or_empty_request_id(pair) -> None:
    """found=False for a request id nobody runs; INVALID_ARGUMENT for an empty one."""
    for worker in pair:
        assert not worker.stub.Abort(pb.AbortRequest(request_id="nobody-runs-this"), timeout=RPC_TIMEOUT_S).found
        assert error_of(lambda: worker.stub.Abort(pb.AbortRequest(), timeout=RPC_TIMEOUT_S)).code() == INVALID


# -- duplicate request ids --------------------------------------------------------------------------


def test_a_request_id_already_in_flight_is_refused_and_the_first_serves_on(pair) -> None:
    """INVALID_ARGUMENT for a second Generate with the id of one still decoding; the first is not
    disturbed (it ends with all its tokens); both pools end full."""
    _, generation = pair
    max_tokens = MAX_MODEL_LEN - len(PROMPT) - 1  # long enough to still run when its twin arrives
    first = generation.stub.Generate(generate_request("twin", PROMPT, params=greedy(max_tokens)), timeout=RPC_TIMEOUT_S)
    chunks = [next(first)]
    error = error_of(lambda: generation.stub.Generate(generate_request("twin", PROMPT, params=greedy(4)),
                                                      timeout=RPC_TIMEOUT_S))
    assert error.code() == INVALID and "duplicate" in error.details(), error.details()
    chunks.extend(first)
    assert len(tokens_of(chunks)) == max_tokens and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert_nothing_lost(pair)


def test_concurrent_twins_end_one_served_one_refused_or_both_served(pair) -> None:
    """Two Prefills, and then two Generates with handles, sent at once under one request id:
    each ends OK or INVALID_ARGUMENT (never a hang, never INTERNAL), and at least one is OK."""
    context, generation = pair
    prefills = [context.stub.Prefill.future(pb.PrefillRequest(request_id="twin-prefill", prompt_token_ids=PROMPT,
                                                              params=greedy(8)), timeout=RPC_TIMEOUT_S) for _ in range(2)]
    codes = [code_of(lambda: release(context, future.result().kv_handle)) for future in prefills]
    assert OK in codes and set(codes) <= {OK, INVALID}, codes
    replies = [prefill(context, f"twin-handle-{i}", PROMPT) for i in range(2)]
    results: list[grpc.StatusCode] = []

    def run(reply: pb.PrefillResponse) -> None:
        results.append(code_of(lambda: generation.stub.Generate(
            generate_request("twin-generate", PROMPT, reply.kv_handle, reply.first_token_id), timeout=RPC_TIMEOUT_S)))

    threads = [threading.Thread(target=run, args=(reply,)) for reply in replies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RPC_TIMEOUT_S + 5)
    assert OK in results and set(results) <= {OK, INVALID}, results
    for reply in replies:  # the refused twin's lease, as a router releases a handle never read
        release(context, reply.kv_handle)
    assert_nothing_lost(pair)


# -- requests that can never be served ---------------------------------------------------------------


BAD_PARAMS = {
    "max_tokens 0": (pb.SamplingParams(max_tokens=0), INVALID),
    "temperature -1": (pb.SamplingParams(max_tokens=4, temperature=-1), INVALID),
    "temperature NaN": (pb.SamplingParams(max_tokens=4, temperature=math.nan), INVALID),
    "top_p 0 (unset: 1.0)": (pb.SamplingParams(max_tokens=4, top_p=0), OK),
    "top_p 1.5": (pb.SamplingParams(max_tokens=4, top_p=1.5), INVALID),
    "top_k -1": (pb.SamplingParams(max_tokens=4, top_k=-1), INVALID),
    "logprobs 50": (pb.SamplingParams(max_tokens=4, logprobs=50), INVALID),
    "repetition_penalty NaN": (pb.SamplingParams(max_tokens=4, repetition_penalty=math.nan), INVALID),
    "an empty stop string": (pb.SamplingParams(max_tokens=4, stop=[""]), INVALID),
    "the largest seed": (pb.SamplingParams(max_tokens=4, temperature=1.0, seed=2**64 - 1), OK),
}
BAD_PROMPTS = {
    "empty prompt": ([], INVALID),
    "out-of-vocabulary ids": ([1, VOCAB_SIZE, 2], INVALID),
    "the largest id": ([2**32 - 1], INVALID),
    "max_model_len tokens": ([7] * MAX_MODEL_LEN, INVALID),
    "longer than max_model_len": ([7] * (MAX_MODEL_LEN + 50), INVALID),
}


@pytest.mark.parametrize("name", list(BAD_PARAMS) + list(BAD_PROMPTS))
def test_unservable_requests_are_invalid_on_every_path(pair, name) -> None:
    """Each bad prompt or sampling value is answered the same by Prefill (context worker),
    Generate without a handle (local prefill) and Generate with a valid handle (the request is
    refused before a block is reserved; the lease survives for the router to release)."""
    context, generation = pair
    prompt, params, code = PROMPT, greedy(4), None
    if name in BAD_PARAMS:
        params, code = BAD_PARAMS[name]
    else:
        prompt, code = BAD_PROMPTS[name]
    request = pb.PrefillRequest(request_id=f"bad-{name}", prompt_token_ids=prompt, params=params)
    assert code_of(lambda: release(context, context.stub.Prefill(request, timeout=RPC_TIMEOUT_S).kv_handle)) == code
    assert code_of(lambda: generation.stub.Generate(generate_request(f"bad-{name}", prompt, params=params),
                                                    timeout=RPC_TIMEOUT_S)) == code
    reply = prefill(context, f"bad-{name}-handle", PROMPT)
    handle = with_changes(reply.kv_handle)
    if name in BAD_PROMPTS:  # a handle that matches the bad prompt's length, so the prompt itself is judged
        handle = with_changes(handle, num_tokens=len(prompt), block_ids=list(range(-(-len(prompt) // BLOCK_SIZE))))
    assert code_of(lambda: generation.stub.Generate(
        generate_request(f"bad-{name}-handle", prompt, handle, reply.first_token_id, params),
        timeout=RPC_TIMEOUT_S)) == code
    if context.stats().num_leases:
        assert release(context, reply.kv_handle)
    assert_nothing_lost(pair, timeout=2.0)


@pytest.mark.parametrize("first_token_id", [None, VOCAB_SIZE, 2**32 - 1])
def test_handle_without_a_valid_first_token_is_invalid(pair, first_token_id) -> None:
    """INVALID_ARGUMENT: a kv_handle needs the first token its Prefill sampled, inside the vocabulary."""
    context, generation = pair
    reply = prefill(context, f"first-{first_token_id}", PROMPT)
    error = error_of(lambda: generation.stub.Generate(
        generate_request(f"first-{first_token_id}", PROMPT, reply.kv_handle, first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == INVALID and "first" in error.details(), error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(pair, timeout=2.0)


def test_wrong_role_is_a_failed_precondition(pair) -> None:
    """FAILED_PRECONDITION: Prefill on a generation worker, Generate on a context worker."""
    context, generation = pair
    request = pb.PrefillRequest(request_id="role", prompt_token_ids=PROMPT, params=greedy(4))
    assert code_of(lambda: generation.stub.Prefill(request, timeout=RPC_TIMEOUT_S)) == PRECONDITION
    assert code_of(lambda: context.stub.Generate(generate_request("role", PROMPT), timeout=RPC_TIMEOUT_S)) == PRECONDITION


# -- random fuzz ------------------------------------------------------------------------------------


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

    def __init__(self, rng: random.Random, pair) -> None:
        self.rng = rng
        self.context, self.generation = pair
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


def test_random_messages_get_documented_statuses_and_lose_nothing(pair) -> None:
    """Every reply to a mutated Prefill, Generate, Release or Abort is OK or a documented
    non-INTERNAL status with a message, each well within its deadline; one message in ten goes
    out together with a second under the same request id. Afterwards both workers hold nothing
    (leases of refused handles expire) and serve a normal request."""
    rng = random.Random(FUZZ_SEED)
    fuzzer = Fuzzer(rng, pair)
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
    assert_nothing_lost(pair)


@pytest.mark.parametrize("method", ["Prefill", "Generate", "Release", "Abort", "Stats", "GetModelInfo"])
def test_bytes_that_are_not_a_protobuf_leave_the_worker_serving(pair, method) -> None:
    """gRPC's own deserializer refuses them (grpcio answers UNKNOWN, naming the DecodeError), or
    they parse as some message that the worker answers like any other; either way at once, and
    the worker serves on."""
    for worker in pair:
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
    assert_nothing_lost(pair, timeout=2.0)
