"""KV hand-off between workers of different tensor-parallel sizes on the CPU (gloo, float32, real
NIXL over UCX): a two-rank worker's kv heads are gathered into whole blocks for a one-rank reader,
and a one-rank worker's blocks are re-split over a two-rank reader's ranks. Both ways the tokens
equal transformers' greedy tokens, the bytes that moved are whole-head blocks, and every block
and lease comes back. A two-rank worker's follower ends with it."""
from __future__ import annotations

import os

import grpc
import pytest
import torch

from tandem.proto import tandem_pb2 as pb
from tiny_models import TINY_LLAMA
from worker_rpc import generate, pool_full, prefill, tokens_of, wait_for

BLOCK_SIZE = 4
STAGING_SLOTS = 12  # the two-rank worker's: enough for one 10-block prompt, not for a 15-block one
NEW_TOKENS = 16
_rng = torch.Generator().manual_seed(11)
# One prompt per direction (a worker's prefix cache would hold the other's), 10 blocks, the last part-filled.
PROMPTS = {d: torch.randint(0, TINY_LLAMA["vocab_size"], (37,), generator=_rng).tolist() for d in ("tp2 to tp1", "tp1 to tp2")}
HEAD_DIM = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
# A wire block: every layer, K and V, every kv head of the model, float32.
WIRE_BYTES_PER_BLOCK = TINY_LLAMA["num_hidden_layers"] * 2 * BLOCK_SIZE * TINY_LLAMA["num_key_value_heads"] * HEAD_DIM * 4


@pytest.fixture(scope="module")
def workers(start_worker, tiny_llama):
    """Two aggregated workers (each serves Prefill and Generate): one of two ranks, one of one."""
    args = ["--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
            "--kv-cache-bytes", str(1 << 18), "--lease-seconds", "10"]
    return start_worker.all(
        start_worker.launch("aggregated", *args, "--tensor-parallel-size", "2", "--staging-blocks", str(STAGING_SLOTS)),
        start_worker.launch("aggregated", *args),
    )


def transformers_greedy(tiny_llama, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = tiny_llama[1].generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("direction", list(PROMPTS))
def test_hand_off_between_tensor_parallel_sizes_gives_transformers_tokens(workers, tiny_llama, direction) -> None:
    two_ranks, one_rank = workers
    owner, reader = (two_ranks, one_rank) if direction == "tp2 to tp1" else (one_rank, two_ranks)
    prompt, request_id = PROMPTS[direction], f"resplit-{direction.replace(' ', '-')}"
    computed_before = reader.stats().num_prompt_tokens_computed
    reply = prefill(owner, request_id, prompt, NEW_TOKENS)
    assert reply.HasField("kv_handle"), reply
    num_blocks = -(-len(prompt) // BLOCK_SIZE)
    assert len(reply.kv_handle.block_ids) == num_blocks
    if owner is two_ranks:  # its cache holds half the heads: the handle points at gathered whole blocks
        assert reply.kv_handle.HasField("staging_offset")
    chunks = generate(reader, request_id, prompt, reply, NEW_TOKENS)
    assert [reply.first_token_id, *tokens_of(chunks)] == transformers_greedy(tiny_llama, prompt)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    report = chunks[0].transfer
    assert report.num_blocks == num_blocks
    assert report.num_bytes == num_blocks * WIRE_BYTES_PER_BLOCK
    assert reader.stats().num_prompt_tokens_computed == computed_before, "the reader computed prompt tokens" 
    # Lease released by the reader's confirmation, blocks back in both pools once the request ends.
    wait_for(lambda: owner.stats().num_leases == 0, 10, "the owner's lease to end")
    for worker in workers:
        wait_for(lambda w=worker: pool_full(w), 10, "every block back in the pool")


def test_both_report_the_model_s_kv_heads_and_the_same_wire_block(workers) -> None:
    two_ranks, one_rank = workers
    metas = [w.stub.GetTransferMetadata(pb.TransferMetadataRequest(), timeout=10) for w in workers]
    for meta in metas:
        assert meta.num_kv_heads == TINY_LLAMA["num_key_value_heads"]
        assert meta.bytes_per_block == WIRE_BYTES_PER_BLOCK
    assert metas[0].base_address == 0, "a two-rank worker reads nothing in place"
    assert metas[0].staging_slots > 0
    assert metas[1].base_address != 0


def test_a_hand_off_without_free_staging_slots_is_refused_as_retriable_and_frees_its_blocks(workers) -> None:
    two_ranks, _ = workers
    long_prompt = PROMPTS["tp2 to tp1"] + PROMPTS["tp1 to tp2"][:23]  # 60 tokens: 15 blocks
    with pytest.raises(grpc.RpcError) as refused:
        prefill(two_ranks, "no-room", long_prompt, NEW_TOKENS)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "free staging slots" in refused.value.details()
    assert ("tandem-retriable", "true") in refused.value.trailing_metadata()
    stats = two_ranks.stats()
    assert stats.num_leases == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_plain_generate_then_stop_ends_the_follower_rank(workers, tiny_llama) -> None:
    """Last: stops the two-rank worker. Without a handle it prefills itself; its follower exits with it."""
    two_ranks, _ = workers
    prompt = PROMPTS["tp2 to tp1"][:9]
    chunks = generate(two_ranks, "plain-tp2", prompt, max_tokens=NEW_TOKENS)
    assert tokens_of(chunks) == transformers_greedy(tiny_llama, prompt)
    pid = two_ranks.process.pid
    children = [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    assert children, "the follower rank runs as a child process"
    two_ranks.stop()
    assert two_ranks.process.returncode == 0
    wait_for(lambda: not any(os.path.exists(f"/proc/{child}") and _state(child) != "Z" for child in children),
             15, "the follower to exit with its worker")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
