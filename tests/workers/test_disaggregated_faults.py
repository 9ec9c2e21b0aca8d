"""Faults between worker processes of a tiny random Llama (fast to start): greedy tokens through
context -> generation equal transformers', a peer of another block size is refused without leaking
blocks on either side, Abort and Drain answer precisely, and a context worker killed with SIGKILL
fails only the request that needed it, fast and retriable, while the generation worker serves on.
The kill test is last: it leaves the module without a context worker."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import torch

import zmq

from tandem.kvtransfer.block_hash import hash_full_blocks
from tandem.kvtransfer.events import AllBlocksCleared, BlockStored
from tandem.kvtransfer.kv_event_stream import EventBatch, decode_event_batch, parse_kv_event_topic
from tandem.proto import tandem_pb2 as pb
from worker_processes import Launched
from worker_rpc import MAX_TOKENS, generate, pool_full, prefill, run_disaggregated, tokens_of, wait_for

BLOCK_SIZE = 4
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 16
NUM_BLOCKS = 64
LEASE_SECONDS = 3.0
TRANSFER_TIMEOUT_S = 3.0
PROMPTS = {  # shorter than a block, exactly two blocks, several blocks and a part
    "short": [17, 42, 99],
    "two-blocks": [5, 120, 33, 8, 77, 150, 61, 2],
    "long": [11, 140, 23, 64, 3, 98, 131, 45, 7, 88, 19, 156, 72, 30, 101, 9, 54, 127, 36],
}


def kv_bytes_per_block(block_size: int) -> int:
    return NUM_LAYERS * 2 * block_size * NUM_KV_HEADS * HEAD_DIM * 4  # K and V, float32


def worker_args(model_dir, block_size: int = BLOCK_SIZE) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--block-size", str(block_size),
            "--kv-cache-bytes", str(NUM_BLOCKS * kv_bytes_per_block(block_size)), "--lease-seconds", str(LEASE_SECONDS)]


# This pair stages every handle (the GPU path for scattered blocks); the SmolLM2 pair of
# test_disaggregated.py reads blocks where they are.
STAGING = ["--staging-blocks", "32", "--stage-min-runs", "0"]


@pytest.fixture(scope="module")
def launched(start_worker, tiny_llama) -> dict[str, Launched]:
    """Every worker process of the module, started at once; the fixtures below wait for theirs."""
    model_dir, _ = tiny_llama
    return {
        "context": start_worker.launch("context", *worker_args(model_dir), *STAGING),
        "generation": start_worker.launch("generation", *worker_args(model_dir), *STAGING,
                                          "--transfer-timeout", str(TRANSFER_TIMEOUT_S)),
        # Same model, but 8-token blocks in bfloat16: its KV bytes mean something else.
        "mismatched": start_worker.launch("generation", *worker_args(model_dir, block_size=8), "--dtype", "bfloat16",
                                          "--transfer-timeout", str(TRANSFER_TIMEOUT_S)),
        "aggregated": start_worker.launch("aggregated", *worker_args(model_dir)),
    }


@pytest.fixture(scope="module")
def pair(start_worker, launched):
    return start_worker.all(launched["context"], launched["generation"])


@pytest.fixture(scope="module")
def mismatched_generation(start_worker, launched):
    """Same model, but 8-token blocks in bfloat16: its KV bytes mean something else."""
    (worker,) = start_worker.all(launched["mismatched"])
    return worker


@pytest.fixture(scope="module")
def aggregated(start_worker, launched):
    (worker,) = start_worker.all(launched["aggregated"])
    return worker










def expected_tokens(hf_model, prompt_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()






def test_greedy_tokens_equal_transformers_and_blocks_return(pair, tiny_llama) -> None:
    context, generation = pair
    _, hf_model = tiny_llama
    for name, prompt_ids in PROMPTS.items():
        assert run_disaggregated(pair, f"greedy-{name}", prompt_ids)[0] == expected_tokens(hf_model, prompt_ids), name
    assert pool_full(generation)
    wait_for(lambda: pool_full(context) and context.stats().num_leases == 0, 5.0, "the READs' notifications to end the leases")


def test_shared_prefix_reads_only_the_missing_staged_blocks(pair, tiny_llama) -> None:
    context, generation = pair
    _, hf_model = tiny_llama
    prefix = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]  # two full blocks and a part
    run_disaggregated(pair, "prefix-a", prefix)
    longer = prefix + [46, 26, 43, 38, 32, 79, 50]
    tokens, reply, chunks = run_disaggregated(pair, "prefix-b", longer)
    assert reply.kv_handle.HasField("staging_offset")
    assert chunks[0].transfer.num_cached_blocks == 2
    assert chunks[0].transfer.num_blocks == len(reply.kv_handle.block_ids) - 2
    assert tokens == expected_tokens(hf_model, longer)
    wait_for(lambda: pool_full(context) and context.stats().num_leases == 0, 5.0, "the lease to end")


@pytest.mark.parametrize("prompt_name", ["short", "long"])  # one block on either side; more blocks on one
def test_peer_of_another_block_size_and_dtype_is_refused_and_leaks_nothing(pair, mismatched_generation, prompt_name) -> None:
    context, _ = pair
    other = mismatched_generation
    prompt_ids = PROMPTS[prompt_name]
    reply = prefill(context, f"pairing-{prompt_name}", prompt_ids)
    with pytest.raises(grpc.RpcError) as refused:
        generate(other, f"pairing-{prompt_name}", prompt_ids, reply)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert "block_size 4 there, 8 here" in refused.value.details()
    assert "kv_dtype 'float32' there, 'bfloat16' here" in refused.value.details()
    assert pool_full(other)
    assert context.stub.Release(pb.ReleaseRequest(handle=reply.kv_handle), timeout=10).released
    stats = context.stats()
    assert stats.num_leases == 0 and stats.num_free_blocks == stats.num_total_blocks


def replayed_batches(worker) -> list[tuple[int, EventBatch]]:
    """Every KV-event batch the worker still buffers, asked from seq 0 on its ZMQ replay socket."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(worker.ready["kv_events_replay_endpoint"])
    try:
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        batches = []
        while dealer.poll(5000):
            _, seq, payload = dealer.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                return batches
            batches.append((int.from_bytes(seq, "big"), decode_event_batch(payload)))
        pytest.fail("no end-of-replay frame within 5 s")
    finally:
        dealer.close()


def test_both_workers_publish_the_blocks_they_hold_as_vllm_kv_events(pair) -> None:
    prompt_ids = [7, 1, 4, 9, 60, 61, 62, 63, 99]  # two full blocks and a part
    run_disaggregated(pair, "events-1", prompt_ids)
    expected = hash_full_blocks(prompt_ids, BLOCK_SIZE)
    for worker in pair:
        worker_id, epoch, _model = parse_kv_event_topic(worker.ready["kv_events_topic"])
        assert (worker_id, epoch) == (worker.ready["worker_id"], worker.ready["epoch"])
        batches = replayed_batches(worker)
        assert [seq for seq, _ in batches] == list(range(len(batches)))
        assert batches[0][1].events == (AllBlocksCleared(),)  # every epoch starts empty
        stored = {}  # block hash -> (its parent's hash, its tokens)
        for _, batch in batches:
            for event in batch.events:
                if isinstance(event, BlockStored):
                    parents = (event.parent_block_hash, *event.block_hashes[:-1])
                    for i, (block_hash, parent) in enumerate(zip(event.block_hashes, parents)):
                        stored[block_hash] = (parent, event.token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        assert stored[expected[0]] == (None, tuple(prompt_ids[:4]))
        assert stored[expected[1]] == (expected[0], tuple(prompt_ids[4:8]))


def test_abort_after_prefill_releases_the_lease_at_once(pair) -> None:
    context, _ = pair
    reply = prefill(context, "abort-held", PROMPTS["long"])
    assert context.stats().num_leases == 1
    assert context.stub.Abort(pb.AbortRequest(request_id="abort-held"), timeout=10).found
    stats = context.stats()
    assert stats.num_leases == 0 and stats.num_leases_expired == 0 and pool_full(context)
    assert not context.stub.Release(pb.ReleaseRequest(handle=reply.kv_handle), timeout=10).released


def test_abort_while_decoding_ends_the_stream_and_frees_the_blocks(pair) -> None:
    context, generation = pair
    reply = prefill(context, "abort-decoding", PROMPTS["two-blocks"], max_tokens=200)
    request = pb.GenerateRequest(request_id="abort-decoding", prompt_token_ids=PROMPTS["two-blocks"],
                                 params=pb.SamplingParams(max_tokens=200, ignore_eos=True),
                                 kv_handle=reply.kv_handle, first_token_id=reply.first_token_id)
    stream = generation.stub.Generate(request, timeout=60)
    first = next(stream)
    assert first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert generation.stub.Abort(pb.AbortRequest(request_id="abort-decoding"), timeout=10).found
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert len(tokens_of([first, *rest])) < 199
    wait_for(lambda: pool_full(generation), 5.0, "the aborted request's blocks")


def test_abort_of_an_unknown_request_finds_nothing(pair) -> None:
    _, generation = pair
    assert not generation.stub.Abort(pb.AbortRequest(request_id="nobody"), timeout=10).found


def test_drained_worker_refuses_new_work_as_retriable(aggregated) -> None:
    assert len(tokens_of(generate(aggregated, "before-drain", PROMPTS["short"]))) == MAX_TOKENS
    assert aggregated.stub.Drain(pb.DrainRequest(), timeout=30).num_requests_finished == 0
    assert aggregated.stats().draining
    for call in (lambda: prefill(aggregated, "after-drain", PROMPTS["short"]),
                 lambda: generate(aggregated, "after-drain", PROMPTS["short"])):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "draining" in refused.value.details()


def test_killed_context_worker_fails_its_request_fast_and_generation_serves_on(pair, tiny_llama) -> None:
    context, generation = pair
    _, hf_model = tiny_llama
    run_disaggregated(pair, "before-kill", PROMPTS["long"])  # the generation worker now holds the peer
    prompt_ids = PROMPTS["two-blocks"][::-1]  # nothing of it cached on the generation side
    reply = prefill(context, "orphaned-by-kill", prompt_ids)
    os.kill(context.process.pid, signal.SIGKILL)
    context.process.wait(10)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        generate(generation, "orphaned-by-kill", prompt_ids, reply)
    elapsed = time.monotonic() - start
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert context.ready["worker_id"] in failed.value.details()
    assert elapsed < TRANSFER_TIMEOUT_S + 5, elapsed
    wait_for(lambda: pool_full(generation) and generation.stats().num_transferring == 0, 10.0,
             "the failed READ's blocks to return to the generation pool")
    assert tokens_of(generate(generation, "after-kill", PROMPTS["long"])) == expected_tokens(hf_model, PROMPTS["long"])
