"""One context and one generation worker process of the embedded SmolLM2, over gRPC and real NIXL
(UCX over shared memory/TCP on this CPU): the tokens equal transformers' and the aggregated
engine's, the KV bytes that arrived equal the ones that left, a shared prefix moves only what the
generation worker lacks, and leases, epochs and bad requests are refused or reclaimed cleanly."""
from __future__ import annotations

import time

import grpc
import pytest
import torch

from tandem.kvtransfer.nixl_transfer import PeerMetadata, TransferEngine
from tandem.proto import tandem_pb2 as pb
from tandem.workers.sampling_params import SamplingParams
from worker_rpc import MAX_TOKENS, generate, greedy, prefill, run_disaggregated, wait_for

LEASE_SECONDS = 4.0
KV_CACHE_BYTES = 64 * 737_280  # 64 blocks of 16 tokens of SmolLM2 in float32
PROMPT = (
    "A long time ago, in a small village at the foot of the mountains, there lived an old clockmaker who "
    "repaired every clock in the valley. Each morning he opened his shop at dawn, lit a small lamp, and"
)


@pytest.fixture(scope="module")
def pair(start_worker):
    common = ["--kv-cache-bytes", str(KV_CACHE_BYTES), "--dtype", "float32", "--device", "cpu"]
    return start_worker.all(start_worker.launch("context", *common, "--lease-seconds", str(LEASE_SECONDS)),
                            start_worker.launch("generation", *common, "--transfer-timeout", "5"))


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> list[int]:
    return smollm2.tokenizer(PROMPT)["input_ids"]












def test_greedy_tokens_equal_transformers_and_the_aggregated_engine(pair, prompt_ids, hf_smollm2, make_llm) -> None:
    tokens, reply, chunks = run_disaggregated(pair, "greedy-1", prompt_ids)
    with torch.inference_mode():
        expected = hf_smollm2.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = expected[0, len(prompt_ids):].tolist()
    aggregated = make_llm().generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    assert tokens == expected == aggregated.token_ids
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    report = chunks[0].transfer
    assert report.num_blocks == len(reply.kv_handle.block_ids) == -(-len(prompt_ids) // 16)
    assert report.num_bytes == report.num_blocks * 737_280


def test_blocks_that_arrived_hold_the_bytes_that_left(pair, prompt_ids) -> None:
    context, generation = pair
    reply = prefill(context, "bytes-1", prompt_ids, max_tokens=2)
    chunks = generate(generation, "bytes-1", prompt_ids, reply, max_tokens=2)
    # The generation worker's blocks stay in its prefix cache after the request; the context's are
    # now free but nothing else ran. Read both into this process over NIXL and compare the slots
    # that hold prompt tokens (the last block's tail belongs to other tokens on each side).
    remote = {"context": list(reply.kv_handle.block_ids), "generation": list(chunks[0].transfer.local_block_ids)}
    num_blocks = len(remote["context"])
    kv = {}
    for name, worker in (("context", context), ("generation", generation)):
        meta = worker.stub.GetTransferMetadata(pb.TransferMetadataRequest(), timeout=10)
        local = torch.full((num_blocks, meta.num_layers, 2, meta.block_size, meta.num_kv_heads, meta.head_dim), float("nan"))
        engine = TransferEngine(f"test-reader-{name}", local, worker_id=f"test-{name}", epoch=1)
        try:
            engine.add_peer(PeerMetadata(meta.worker_id, meta.epoch, meta.agent_name, meta.agent_metadata,
                                         meta.base_address, meta.bytes_per_block, meta.num_blocks, meta.memory_type,
                                         meta.device_id))
            engine.read_blocks(meta.worker_id, meta.epoch, remote[name], range(num_blocks), deadline=time.monotonic() + 10)
        finally:
            engine.close()
        kv[name] = local.permute(0, 3, 1, 2, 4, 5).reshape(num_blocks * meta.block_size, -1)[: len(prompt_ids)]
    assert not torch.isnan(kv["context"]).any() and kv["context"].abs().sum() > 0
    assert torch.equal(kv["context"], kv["generation"])


def test_shared_prefix_moves_only_the_missing_blocks(pair, prompt_ids, smollm2) -> None:
    context, generation = pair
    run_disaggregated(pair, "prefix-1", prompt_ids, max_tokens=2)
    before = generation.stats().num_transferred_bytes
    longer = prompt_ids + smollm2.tokenizer(" and the clocks began to sing.")["input_ids"]
    tokens, reply, chunks = run_disaggregated(pair, "prefix-2", longer, max_tokens=4)
    report = chunks[0].transfer
    assert report.num_cached_blocks == len(prompt_ids) // 16 > 0
    assert report.num_blocks == len(reply.kv_handle.block_ids) - report.num_cached_blocks
    assert generation.stats().num_transferred_bytes - before == report.num_blocks * 737_280
    assert generation.stats().num_free_blocks == generation.stats().num_total_blocks


def test_acknowledged_leases_unpin_at_once(pair, prompt_ids) -> None:
    context, _ = pair
    run_disaggregated(pair, "ack-1", prompt_ids, max_tokens=2)
    wait_for(lambda: context.stats().num_leases == 0, 2.0, "the READ's notification to end the lease")
    stats = context.stats()
    assert stats.num_pinned_blocks == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_unacknowledged_lease_expires_and_frees_its_blocks(pair, prompt_ids) -> None:
    context, generation = pair
    expired_before = context.stats().num_leases_expired
    reply = prefill(context, "orphan-1", prompt_ids)
    stats = context.stats()
    assert stats.num_leases == 1 and stats.num_pinned_blocks == len(reply.kv_handle.block_ids)
    wait_for(lambda: context.stats().num_leases == 0, LEASE_SECONDS + 5, "the lease to expire")
    stats = context.stats()
    assert stats.num_leases_expired == expired_before + 1
    assert stats.num_free_blocks == stats.num_total_blocks
    with pytest.raises(grpc.RpcError) as refused:  # the handle is no good any more
        generate(generation, "orphan-1", prompt_ids, reply)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lease" in refused.value.details()
    assert generation.stats().num_free_blocks == generation.stats().num_total_blocks


def test_stale_epoch_and_unknown_handles_are_refused(pair, prompt_ids) -> None:
    context, generation = pair
    reply = prefill(context, "stale-1", prompt_ids)
    stale = pb.KVHandle()
    stale.CopyFrom(reply.kv_handle)
    stale.epoch += 1
    with pytest.raises(grpc.RpcError) as error:
        context.stub.Release(pb.ReleaseRequest(handle=stale), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        request = pb.GenerateRequest(request_id="stale-1", prompt_token_ids=prompt_ids, params=greedy(),
                                     kv_handle=stale, first_token_id=reply.first_token_id)
        list(generation.stub.Generate(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in error.value.details()
    unknown = pb.KVHandle()
    unknown.CopyFrom(reply.kv_handle)
    unknown.handle_id += "-nope"
    with pytest.raises(grpc.RpcError) as error:
        context.stub.Release(pb.ReleaseRequest(handle=unknown), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert context.stub.Release(pb.ReleaseRequest(handle=reply.kv_handle), timeout=10).released
    assert not context.stub.Release(pb.ReleaseRequest(handle=reply.kv_handle), timeout=10).released
    assert context.stats().num_free_blocks == context.stats().num_total_blocks
    assert generation.stats().num_free_blocks == generation.stats().num_total_blocks


@pytest.mark.parametrize(
    "call, message, code",
    [
        ("Prefill", pb.PrefillRequest(request_id="bad", prompt_token_ids=[], params=greedy()), "INVALID_ARGUMENT"),
        ("Prefill", pb.PrefillRequest(request_id="bad", prompt_token_ids=[10**6], params=greedy()), "INVALID_ARGUMENT"),
        ("Prefill", pb.PrefillRequest(request_id="bad", prompt_token_ids=[1, 2], params=pb.SamplingParams()), "INVALID_ARGUMENT"),
        ("Prefill", pb.PrefillRequest(prompt_token_ids=[1, 2], params=greedy()), "INVALID_ARGUMENT"),
        ("Prefill", pb.PrefillRequest(request_id="bad", prompt_token_ids=[1, 2],
                                      params=pb.SamplingParams(max_tokens=4, top_p=7.0)), "INVALID_ARGUMENT"),
        ("Generate", pb.GenerateRequest(request_id="bad", prompt_token_ids=[1, 2], params=greedy(),
                                        kv_handle=pb.KVHandle(handle_id="h", worker_id="w")), "INVALID_ARGUMENT"),
        ("Generate", pb.GenerateRequest(request_id="bad", prompt_token_ids=[1, 2], params=greedy(), first_token_id=5,
                                        kv_handle=pb.KVHandle(handle_id="h", worker_id="w", num_tokens=9)), "INVALID_ARGUMENT"),
        ("Generate-on-context", pb.GenerateRequest(request_id="bad", prompt_token_ids=[1, 2], params=greedy()), "FAILED_PRECONDITION"),
        ("Prefill-on-generation", pb.PrefillRequest(request_id="bad", prompt_token_ids=[1, 2], params=greedy()), "FAILED_PRECONDITION"),
    ],
)
def test_malformed_requests_get_a_precise_status_and_harm_nothing(pair, prompt_ids, call, message, code) -> None:
    context, generation = pair
    target = {"Prefill": context, "Generate": generation, "Generate-on-context": context,
              "Prefill-on-generation": generation}[call]
    method = call.split("-")[0]
    with pytest.raises(grpc.RpcError) as error:
        result = getattr(target.stub, method)(message, timeout=30)
        if method == "Generate":
            list(result)
    assert error.value.code() == grpc.StatusCode[code], error.value.details()
    assert error.value.details()
    tokens, _, _ = run_disaggregated(pair, f"after-{call}-{code}-{id(message)}", prompt_ids, max_tokens=2)
    assert len(tokens) == 2
