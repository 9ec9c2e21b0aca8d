"""Hand-off between two engines in one process, KV copied by hand: the engine half of
disaggregation. Greedy and seeded tokens equal the single-engine run, and blocks come back."""
from __future__ import annotations

import pytest

from tandem.kvtransfer.block_pool import NoFreeBlocksError
from tandem.workers.engine import LLMEngine
from tandem.workers.errors import InvalidRequestError
from tandem.workers.sampling_params import SamplingParams

PROMPT = (
    "A long time ago, in a small village at the foot of the mountains, there lived an old clockmaker who "
    "repaired every clock in the valley. The clockmaker"
)


def run_to_end(engine: LLMEngine, request_id: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                tokens.extend(out.new_token_ids)
    return tokens


def hand_off(context: LLMEngine, generation: LLMEngine, request_id: str, prompt_ids, params):
    """Prefill on context, copy the blocks, decode on generation; returns all tokens and stats."""
    context.add_request(request_id, prompt_ids, params, hand_off_kv=True)
    [out] = [o for o in context.step() if o.request_id == request_id]
    assert out.held_kv is not None and out.finish_reason is None and out.finished
    first = out.new_token_ids[0]
    reservation = generation.reserve_prefilled(request_id, prompt_ids, first, params)
    remote = out.held_kv.block_ids[reservation.num_cached_blocks :]
    for src, dst in zip(remote, reservation.blocks_to_fill):
        generation.kv_cache[dst] = context.kv_cache[src]
    context.release_blocks(out.held_kv.block_ids)
    generation.commit_prefilled(request_id)
    return [first, *run_to_end(generation, request_id)], reservation


def test_greedy_hand_off_equals_one_engine(make_llm) -> None:
    single, context, generation = make_llm().engine, make_llm().engine, make_llm().engine
    prompt_ids = single.tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    single.add_request("a", prompt_ids, params)
    expected = run_to_end(single, "a")
    tokens, reservation = hand_off(context, generation, "a", prompt_ids, params)
    assert tokens == expected
    assert reservation.num_cached_blocks == 0
    assert context.pool.num_used_blocks == 0 and generation.pool.num_used_blocks == 0
    # The same prompt again: generation already holds its full blocks, only the tail moves.
    tokens, reservation = hand_off(context, generation, "b", prompt_ids, params)
    assert tokens == expected
    assert reservation.num_cached_blocks == len(prompt_ids) // 16 > 0
    assert context.pool.num_used_blocks == 0 and generation.pool.num_used_blocks == 0


def test_seeded_sampling_hand_off_equals_one_engine(make_llm) -> None:
    single, context, generation = make_llm().engine, make_llm().engine, make_llm().engine
    prompt_ids = single.tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    single.add_request("s", prompt_ids, params)
    expected = run_to_end(single, "s")
    tokens, _ = hand_off(context, generation, "s", prompt_ids, params)
    assert tokens == expected


def test_first_token_that_finishes_is_not_handed_off(make_llm) -> None:
    context = make_llm().engine
    context.add_request("one", [1, 2, 3], SamplingParams(max_tokens=1), hand_off_kv=True)
    [out] = context.step()
    assert out.held_kv is None and out.finish_reason is not None
    assert context.pool.num_used_blocks == 0


def test_reservation_errors_change_nothing(make_llm) -> None:
    generation = make_llm(num_blocks=8).engine
    params = SamplingParams(max_tokens=8)
    generation.reserve_prefilled("x", list(range(100)), 5, params)  # 7 of the 8 blocks
    with pytest.raises(NoFreeBlocksError):
        generation.reserve_prefilled("big", list(range(40)), 5, params)
    with pytest.raises(InvalidRequestError, match="duplicate"):
        generation.reserve_prefilled("x", [1, 2, 3], 5, params)
    with pytest.raises(InvalidRequestError, match="first token"):
        generation.reserve_prefilled("eos", [1, 2], min(generation.eos_token_ids), params)
    with pytest.raises(InvalidRequestError, match="first token"):
        generation.reserve_prefilled("bad", [1, 2], -1, params)
    assert generation.pool.num_used_blocks == 7
    assert generation.cancel_prefilled("x") == ()
    assert generation.pool.num_used_blocks == 0
