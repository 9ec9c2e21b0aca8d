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

Random messages are in test_grpc_fuzz_random.py; the workers and helpers in grpc_fuzz_support.py.
"""
from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from tandem.proto import tandem_pb2 as pb
from worker_rpc import greedy, pool_full, prefill, tokens_of, wait_for
from grpc_fuzz_support import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    LEASE_SECONDS,
    PEER_TIMEOUT_S,
    RPC_TIMEOUT_S,
    PROMPT,
    MAX_MODEL_LEN,
    VOCAB_SIZE,
    REFUSED_ADDRESS,
    OK,
    INVALID,
    PRECONDITION,
    NOT_FOUND,
    UNAVAILABLE,
    code_of,
    error_of,
    generate_request,
    with_changes,
    release,
    assert_nothing_lost,
)


# -- handles that name no live lease ------------------------------------------------------------


def test_generate_with_a_never_issued_handle_is_not_found(fuzz_pair) -> None:
    """NOT_FOUND: the owner never issued this handle id, whatever the rest of the handle says
    (here: a live handle's blocks, worker and epoch, so only the owner can tell)."""
    context, generation = fuzz_pair
    reply = prefill(context, "never-issued", PROMPT)
    forged = with_changes(reply.kv_handle, handle_id=reply.kv_handle.handle_id + "0000")
    error = error_of(lambda: generation.stub.Generate(
        generate_request("never-issued", PROMPT, forged, reply.first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == NOT_FOUND, error.details()
    assert forged.handle_id in error.details()
    assert release(context, reply.kv_handle)  # the real lease was left alone
    assert_nothing_lost(fuzz_pair)


@pytest.mark.parametrize("ended_by", ["release", "read"])
def test_replayed_handle_is_refused_as_an_ended_lease(fuzz_pair, ended_by) -> None:
    """FAILED_PRECONDITION: a handle whose lease ended (released by the router, or acknowledged by
    a READ that served it) names blocks that may hold another prompt now. With ended_by "read" the
    generation worker holds all the prompt's full blocks itself, and still refuses."""
    context, generation = fuzz_pair
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
    assert_nothing_lost(fuzz_pair)


def test_handle_whose_lease_deadline_passed_is_refused(fuzz_pair) -> None:
    """FAILED_PRECONDITION, at once: the deadline in the handle has passed (the owner's lease may
    still run: only the reader's clock says so). Nothing moves; the router's Release still works."""
    context, generation = fuzz_pair
    reply = prefill(context, "deadline-passed", PROMPT)
    late = with_changes(reply.kv_handle, lease_deadline_unix=time.time() - 1)
    error = error_of(lambda: generation.stub.Generate(
        generate_request("deadline-passed", PROMPT, late, reply.first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == PRECONDITION and "lease" in error.details(), error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(fuzz_pair)


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


def test_handle_that_does_not_match_the_prompt_or_its_lease_is_invalid(fuzz_pair) -> None:
    """INVALID_ARGUMENT for each handle in bad_handles: its token or block count is not the
    prompt's, its blocks are not the ones the owner leased under that id (other ids, another
    order, out of the owner's range), or a field no owner writes. The real lease survives them all."""
    context, generation = fuzz_pair
    reply = prefill(context, "bad-handles", PROMPT)
    for name, handle in bad_handles(reply.kv_handle).items():
        error = error_of(lambda: generation.stub.Generate(
            generate_request(f"bad-handle-{name}", PROMPT, handle, reply.first_token_id), timeout=RPC_TIMEOUT_S))
        assert error.code() == INVALID, (name, error.code(), error.details())
        assert pool_full(generation), name
    assert context.stats().num_leases == 1
    assert release(context, reply.kv_handle)
    assert_nothing_lost(fuzz_pair)


@pytest.mark.parametrize("epoch_change", [-1, +1])
def test_handle_of_another_epoch_is_refused(fuzz_pair, epoch_change) -> None:
    """FAILED_PRECONDITION for Generate and for Release: the owner restarted (older handle) or the
    handle is not from its present epoch; its blocks are not these."""
    context, generation = fuzz_pair
    reply = prefill(context, f"epoch{epoch_change:+d}", PROMPT)
    other = with_changes(reply.kv_handle, epoch=reply.kv_handle.epoch + epoch_change)
    for call in (lambda: generation.stub.Generate(generate_request(f"epoch{epoch_change:+d}", PROMPT, other,
                                                                   reply.first_token_id), timeout=RPC_TIMEOUT_S),
                 lambda: context.stub.Release(pb.ReleaseRequest(handle=other), timeout=RPC_TIMEOUT_S)):
        error = error_of(call)
        assert error.code() == PRECONDITION and "epoch" in error.details(), error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(fuzz_pair)


def test_handle_naming_another_worker_at_the_owners_address_is_refused(fuzz_pair) -> None:
    """FAILED_PRECONDITION: the address answers as another worker (it was replaced there); the
    same for a handle naming the generation worker itself at its own address."""
    context, generation = fuzz_pair
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
    assert_nothing_lost(fuzz_pair)


@pytest.fixture(scope="module")
def silent_address() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield f"127.0.0.1:{silent.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_handle_whose_owner_is_unreachable_fails_in_bounded_time(fuzz_pair, silent_address, kind) -> None:
    """UNAVAILABLE (retriable), in bounded time: nothing listens at the handle's address (at once),
    or something listens and never answers (after the peer timeout, 5 s, or sooner when the lease
    ends first: here after its 3 s less the reader's 0.5 s margin)."""
    context, generation = fuzz_pair
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
    assert_nothing_lost(fuzz_pair)


# -- Release and Abort ----------------------------------------------------------------------------


def test_release_twice_never_issued_and_of_another_epoch(fuzz_pair) -> None:
    """Release: released=True once, then released=False (harmless); NOT_FOUND for an id never
    issued; FAILED_PRECONDITION for another epoch; INVALID_ARGUMENT for a handle without an id."""
    context, _ = fuzz_pair
    reply = prefill(context, "release-twice", PROMPT)
    handle = reply.kv_handle
    assert release(context, handle) and not release(context, handle)
    assert error_of(lambda: release(context, with_changes(handle, handle_id=f"{handle.worker_id}/{handle.epoch}/999999"))
                    ).code() == NOT_FOUND
    assert error_of(lambda: release(context, with_changes(handle, epoch=handle.epoch + 1))).code() == PRECONDITION
    assert error_of(lambda: release(context, pb.KVHandle())).code() == INVALID
    assert_nothing_lost(fuzz_pair)


def test_abort_of_an_unknown_or_empty_request_id(fuzz_pair) -> None:
    """found=False for a request id nobody runs; INVALID_ARGUMENT for an empty one."""
    for worker in fuzz_pair:
        assert not worker.stub.Abort(pb.AbortRequest(request_id="nobody-runs-this"), timeout=RPC_TIMEOUT_S).found
        assert error_of(lambda: worker.stub.Abort(pb.AbortRequest(), timeout=RPC_TIMEOUT_S)).code() == INVALID


# -- duplicate request ids --------------------------------------------------------------------------


def test_a_request_id_already_in_flight_is_refused_and_the_first_serves_on(fuzz_pair) -> None:
    """INVALID_ARGUMENT for a second Generate with the id of one still decoding; the first is not
    disturbed (it ends with all its tokens); both pools end full."""
    _, generation = fuzz_pair
    max_tokens = MAX_MODEL_LEN - len(PROMPT) - 1  # long enough to still run when its twin arrives
    first = generation.stub.Generate(generate_request("twin", PROMPT, params=greedy(max_tokens)), timeout=RPC_TIMEOUT_S)
    chunks = [next(first)]
    error = error_of(lambda: generation.stub.Generate(generate_request("twin", PROMPT, params=greedy(4)),
                                                      timeout=RPC_TIMEOUT_S))
    assert error.code() == INVALID and "duplicate" in error.details(), error.details()
    chunks.extend(first)
    assert len(tokens_of(chunks)) == max_tokens and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert_nothing_lost(fuzz_pair)


def test_concurrent_twins_end_one_served_one_refused_or_both_served(fuzz_pair) -> None:
    """Two Prefills, and then two Generates with handles, sent at once under one request id:
    each ends OK or INVALID_ARGUMENT (never a hang, never INTERNAL), and at least one is OK."""
    context, generation = fuzz_pair
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
    assert_nothing_lost(fuzz_pair)


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
def test_unservable_requests_are_invalid_on_every_path(fuzz_pair, name) -> None:
    """Each bad prompt or sampling value is answered the same by Prefill (context worker),
    Generate without a handle (local prefill) and Generate with a valid handle (the request is
    refused before a block is reserved; the lease survives for the router to release)."""
    context, generation = fuzz_pair
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
    assert_nothing_lost(fuzz_pair, timeout=2.0)


@pytest.mark.parametrize("first_token_id", [None, VOCAB_SIZE, 2**32 - 1])
def test_handle_without_a_valid_first_token_is_invalid(fuzz_pair, first_token_id) -> None:
    """INVALID_ARGUMENT: a kv_handle needs the first token its Prefill sampled, inside the vocabulary."""
    context, generation = fuzz_pair
    reply = prefill(context, f"first-{first_token_id}", PROMPT)
    error = error_of(lambda: generation.stub.Generate(
        generate_request(f"first-{first_token_id}", PROMPT, reply.kv_handle, first_token_id), timeout=RPC_TIMEOUT_S))
    assert error.code() == INVALID and "first" in error.details(), error.details()
    assert release(context, reply.kv_handle)
    assert_nothing_lost(fuzz_pair, timeout=2.0)


def test_wrong_role_is_a_failed_precondition(fuzz_pair) -> None:
    """FAILED_PRECONDITION: Prefill on a generation worker, Generate on a context worker."""
    context, generation = fuzz_pair
    request = pb.PrefillRequest(request_id="role", prompt_token_ids=PROMPT, params=greedy(4))
    assert code_of(lambda: generation.stub.Prefill(request, timeout=RPC_TIMEOUT_S)) == PRECONDITION
    assert code_of(lambda: context.stub.Generate(generate_request("role", PROMPT), timeout=RPC_TIMEOUT_S)) == PRECONDITION


# -- random fuzz ------------------------------------------------------------------------------------
