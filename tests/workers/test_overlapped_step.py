"""The overlapped (async) step on the embedded SmolLM2: every request gets the same outputs as
with the synchronous step (and so transformers' tokens), one step late; no block leaks, no prefix
hash covers a token still in flight, and rows that need the host's tokens fall back."""
from __future__ import annotations

import pytest
import torch

from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine, RequestOutput
from tandem.workers.kv_blocks import SequenceBlocks
from tandem.workers.kv_cache_sizing import kv_cache_spec
from tandem.workers.model_runner import DeviceInputs
from tandem.workers.overlapped_step import overlap_enabled
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import SchedulerConfig
from tandem.workers.sequence import PLACEHOLDER_TOKEN_ID, FinishReason

CPU = torch.device("cpu")
STORY = (
    "A long time ago, in a small village at the foot of the mountains, there lived an old clockmaker who "
    "repaired every clock in the valley. Each morning he opened his shop at dawn, lit a small lamp, and "
    "listened to the ticking of a hundred clocks at once. The clockmaker"
)
PROMPTS = ["Hi", "The capital of France is", "Write a haiku about the sea and the wind. The waves", STORY, "Once upon a time"]


@pytest.fixture(autouse=True)
def no_placeholder_is_hashed_or_recomputed(monkeypatch):
    """Every engine of this module: a registered block or an admitted sequence holds real tokens."""
    register, admit = SequenceBlocks.register_full_blocks, SequenceBlocks.admit

    def checked_register(self, seq) -> None:
        full = seq.num_computed_tokens // self.block_size * self.block_size
        assert PLACEHOLDER_TOKEN_ID not in seq.token_ids[:full], f"{seq.request_id}: a placeholder would be hashed"
        register(self, seq)

    def checked_admit(self, seq, cached_block_ids, num_new_tokens) -> bool:
        assert PLACEHOLDER_TOKEN_ID not in seq.token_ids, f"{seq.request_id}: recomputed from a placeholder"
        return admit(self, seq, cached_block_ids, num_new_tokens)

    monkeypatch.setattr(SequenceBlocks, "register_full_blocks", checked_register)
    monkeypatch.setattr(SequenceBlocks, "admit", checked_admit)


def make_engine(smollm2, overlap: bool, num_blocks: int = 128, block_size: int = 16, **scheduler: int) -> LLMEngine:
    spec_bytes = kv_cache_spec(smollm2.config, block_size, torch.float32).bytes_per_block
    config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_bytes=num_blocks * spec_bytes),
        scheduler=SchedulerConfig(**scheduler),
        async_scheduling=overlap,
    )
    return LLMEngine(smollm2, config, CPU)


def held_blocks(engine: LLMEngine) -> int:
    """Blocks the live requests hold (shared prefix blocks once)."""
    return len(set().union(*(r.seq.block_ids for r in engine.requests.values())))


def run(engine: LLMEngine, requests: list[tuple[str, str, SamplingParams]]) -> dict[str, list[RequestOutput]]:
    """Every request's outputs, in order, with the pool checked after each step: the blocks in use
    are exactly those live requests hold, and all come back at the end."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id, _, _ in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
        assert engine.pool.num_used_blocks == held_blocks(engine)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not engine.overlapped.in_flight
    return outputs


def comparable(outputs: list[RequestOutput]) -> list[tuple]:
    return [
        (o.new_token_ids, o.new_text, o.new_logprobs, o.finish_reason, o.num_prompt_tokens, o.num_cached_tokens,
         o.num_output_tokens)
        for o in outputs
    ]


def assert_same_outputs(
    smollm2, requests: list[tuple[str, str, SamplingParams]], **engine_args
) -> tuple[LLMEngine, dict[str, list[RequestOutput]]]:
    """Run ``requests`` synchronously and overlapped; every request's outputs must be identical.
    Returns the overlapped engine and its outputs."""
    sync = run(make_engine(smollm2, False, **engine_args), requests)
    engine = make_engine(smollm2, True, **engine_args)
    overlapped = run(engine, requests)
    for request_id in sync:
        assert comparable(overlapped[request_id]) == comparable(sync[request_id]), request_id
        assert overlapped[request_id][-1].finished
    return engine, overlapped


def test_a_mixed_batch_gives_the_synchronous_outputs(smollm2) -> None:
    lengths = [12, 16, 3, 14, 1]
    requests = [(f"r{i}", p, SamplingParams(max_tokens=n)) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    # Few slots, small blocks, chunked prefill: admissions and finishes reorder the rows each step.
    engine, _ = assert_same_outputs(smollm2, requests, block_size=4, num_blocks=256, max_num_seqs=3, max_num_batched_tokens=24)
    assert engine.overlapped.num_launched > 0


def test_default_batch_of_all_prompts_together(smollm2) -> None:
    engine, _ = assert_same_outputs(smollm2, [(f"r{i}", p, SamplingParams(max_tokens=14)) for i, p in enumerate(PROMPTS)])
    assert engine.overlapped.num_launched > 0


def test_stop_token_and_stop_string_finish_the_same_and_leak_nothing(smollm2) -> None:
    free_run = run(make_engine(smollm2, False), [("free", PROMPTS[1], SamplingParams(max_tokens=12, ignore_eos=True))])
    tokens = [t for o in free_run["free"] for t in o.new_token_ids]
    text = "".join(o.new_text for o in free_run["free"])
    requests = [
        ("token", PROMPTS[1], SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[tokens[3]])),
        ("string", PROMPTS[1], SamplingParams(max_tokens=12, ignore_eos=True, stop=[text.split()[1]])),
        ("long", STORY, SamplingParams(max_tokens=14, ignore_eos=True)),  # runs on after both stop
    ]
    _, outputs = assert_same_outputs(smollm2, requests, block_size=4, num_blocks=256)
    assert outputs["token"][-1].finish_reason is FinishReason.STOP
    assert outputs["token"][-1].num_output_tokens == tokens.index(tokens[3]) + 1
    assert outputs["string"][-1].finish_reason is FinishReason.STOP
    assert outputs["long"][-1].finish_reason is FinishReason.LENGTH


def test_a_token_that_surely_ends_its_request_costs_no_extra_step(smollm2) -> None:
    engine = make_engine(smollm2, True)
    outputs = run(engine, [("a", PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))])
    assert engine.overlapped.num_launched == 3  # one prefill, two decodes: the third token is parked
    assert [o.finish_reason for o in outputs["a"]] == [None, None, FinishReason.LENGTH]
    assert len(outputs["a"]) == 3 and outputs["a"][-1].num_output_tokens == 3


def test_abort_with_a_step_in_flight_frees_everything(smollm2) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = run(make_engine(smollm2, False), [("keep", PROMPTS[1], params)])["keep"]
    engine = make_engine(smollm2, True)
    engine.add_request("keep", PROMPTS[1], params)
    engine.add_request("drop", PROMPTS[4], params)
    delivered = {"keep": [], "drop": []}
    for _ in range(3):
        for out in engine.step():
            delivered[out.request_id].append(out)
    assert engine.overlapped.in_flight and delivered["drop"]
    assert engine.abort("drop")
    while engine.has_unfinished_requests():
        for out in engine.step():
            delivered[out.request_id].append(out)
    final = delivered["drop"][-1]
    assert final.finish_reason is FinishReason.ABORT and final.new_token_ids == ()
    assert final.num_output_tokens == sum(len(o.new_token_ids) for o in delivered["drop"])
    assert comparable(delivered["keep"]) == comparable(expected)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks

    engine.add_request("alone", PROMPTS[1], params)  # the only request, aborted in flight
    engine.step()
    engine.step()
    assert engine.overlapped.in_flight and engine.abort("alone")
    assert engine.has_unfinished_requests()
    [final] = engine.step()
    assert final.finish_reason is FinishReason.ABORT and final.num_output_tokens == 1
    assert not engine.has_unfinished_requests() and not engine.overlapped.in_flight
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_failed_launch_aborts_its_requests_and_the_one_in_flight(smollm2) -> None:
    engine = make_engine(smollm2, True)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request("a", PROMPTS[1], params)
    engine.add_request("b", PROMPTS[4], params)
    engine.step()
    engine.step()
    assert engine.overlapped.in_flight

    def fail(chunks, inputs=None):
        raise RuntimeError("device lost")

    engine.runner.execute = fail  # this runner only
    finals = engine.step()
    assert {o.request_id: o.finish_reason for o in finals} == {"a": FinishReason.ABORT, "b": FinishReason.ABORT}
    assert not engine.has_unfinished_requests() and engine.pool.num_free_blocks == engine.pool.num_blocks
    del engine.runner.execute
    expected = run(make_engine(smollm2, False), [("c", PROMPTS[1], params)])
    assert comparable(run(engine, [("c", PROMPTS[1], params)])["c"]) == comparable(expected["c"])


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(smollm2) -> None:
    requests = [(f"r{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(PROMPTS)]
    sync = run(make_engine(smollm2, False, num_blocks=10), requests)
    engine = make_engine(smollm2, True, num_blocks=10)  # the story alone fits; all five do not
    overlapped = run(engine, requests)
    assert engine.num_preemptions > 0
    for request_id, outputs in sync.items():
        mine = overlapped[request_id]
        assert [t for o in mine for t in o.new_token_ids] == [t for o in outputs for t in o.new_token_ids]
        assert "".join(o.new_text for o in mine) == "".join(o.new_text for o in outputs)
        assert mine[-1].finish_reason is outputs[-1].finish_reason


def test_a_shared_prefix_hits_the_cache_with_identical_tokens(smollm2) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engines = {overlap: make_engine(smollm2, overlap) for overlap in (False, True)}
    runs = {}
    for overlap, engine in engines.items():
        first = run(engine, [("first", STORY, params)])["first"]
        before = engine.num_prompt_tokens_computed
        second = run(engine, [("second", STORY + " smiled", params)])["second"]
        runs[overlap] = (comparable(first), comparable(second), engine.num_prompt_tokens_computed - before)
    assert runs[True] == runs[False]
    num_cached = runs[True][1][-1][5]
    assert num_cached >= 16 * 3 and runs[True][2] == runs[True][1][-1][4] - num_cached


def test_penalties_logprobs_and_seeds_give_the_synchronous_outputs(smollm2) -> None:
    seeded = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    requests = [
        ("greedy", PROMPTS[1], SamplingParams(max_tokens=14, ignore_eos=True)),
        ("penalty", PROMPTS[2], SamplingParams(max_tokens=4, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)),
        ("logprobs", PROMPTS[4], SamplingParams(max_tokens=5, logprobs=2, ignore_eos=True)),
        ("seeded", PROMPTS[0], seeded),
    ]
    engine, _ = assert_same_outputs(smollm2, requests)
    # Synchronous while a penalty or logprobs row lives (5 steps), overlapped after (14 in all).
    assert 0 < engine.overlapped.num_launched <= 14 - 5

    seeded_only, _ = assert_same_outputs(smollm2, [("a", PROMPTS[1], seeded), ("b", PROMPTS[3], seeded)])
    assert seeded_only.overlapped.num_launched == 14  # seeded sampling stays overlapped


def test_a_hand_off_runs_synchronously_and_its_decode_overlaps(smollm2) -> None:
    context, generation = make_engine(smollm2, True), make_engine(smollm2, True)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = run(make_engine(smollm2, False), [("a", STORY, params)])["a"]
    prompt_ids = context.tokenizer(STORY)["input_ids"]
    context.add_request("a", prompt_ids, params, hand_off_kv=True)
    [out] = context.step()  # not one step late: a hand-off needs its token on the host at once
    assert out.held_kv is not None and context.overlapped.num_launched == 0
    reservation = generation.reserve_prefilled("a", prompt_ids, out.new_token_ids[0], params)
    for src, dst in zip(out.held_kv.block_ids[reservation.num_cached_blocks :], reservation.blocks_to_fill):
        generation.kv_cache[dst] = context.kv_cache[src]
    context.release_blocks(out.held_kv.block_ids)
    generation.commit_prefilled("a")
    decoded: list[RequestOutput] = []
    while generation.has_unfinished_requests():
        decoded.extend(generation.step())
    tokens = [*out.new_token_ids, *(t for o in decoded for t in o.new_token_ids)]
    assert tokens == [t for o in expected for t in o.new_token_ids]
    assert generation.overlapped.num_launched > 0 and generation.pool.num_used_blocks == 0


def test_device_inputs_fill_the_rows_they_name() -> None:
    sampled = torch.tensor([11, 12, 13])
    steady = torch.zeros(4, dtype=torch.int64)
    DeviceInputs(sampled, (0, 1, 2), (0, 1, 2)).scatter_into(steady)
    assert steady.tolist() == [11, 12, 13, 0]
    moved = torch.zeros(6, dtype=torch.int64)
    DeviceInputs(sampled, (5, 1), (0, 2)).scatter_into(moved)
    assert moved.tolist() == [0, 13, 0, 0, 0, 11]


def test_async_scheduling_defaults_to_cuda_only_and_never_tensor_parallel() -> None:
    assert not overlap_enabled(None, CPU, tensor_parallel=False)
    assert overlap_enabled(None, torch.device("cuda"), tensor_parallel=False)
    assert overlap_enabled(True, CPU, tensor_parallel=False)
    assert not overlap_enabled(True, torch.device("cuda"), tensor_parallel=True)
    assert not overlap_enabled(False, torch.device("cuda"), tensor_parallel=False)
