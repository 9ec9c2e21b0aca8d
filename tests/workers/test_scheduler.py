"""The scheduler without a model: budgets, chunked prefill, prefix hits, preemption, no leaks."""
from __future__ import annotations

from tandem.kvtransfer.block_pool import BlockPool
from tandem.workers.kv_blocks import SequenceBlocks
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import Scheduler, SchedulerConfig, StepPlan
from tandem.workers.sequence import Sequence, SequenceStatus

BLOCK = 4


def make(num_blocks: int = 64, max_seqs: int = 8, budget: int = 32) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), SequenceBlocks(BlockPool(num_blocks, BLOCK)))


def seq(rid: str, num_prompt: int, first_token: int = 1) -> Sequence:
    return Sequence(rid, tuple(range(first_token, first_token + num_prompt)), SamplingParams(max_tokens=100))


def run_step(sched: Scheduler, plan: StepPlan, next_token: int = 7) -> None:
    """What the engine does after the model ran: advance computed counts, append sampled tokens."""
    for chunk in plan.chunks:
        completes = chunk.completes_sequence
        chunk.seq.num_computed_tokens += chunk.num_tokens
        sched.blocks.register_full_blocks(chunk.seq)
        if completes:
            chunk.seq.token_ids.append(next_token)


def plan_sizes(plan: StepPlan) -> dict[str, int]:
    return {c.seq.request_id: c.num_tokens for c in plan.chunks}


def test_prefills_share_the_token_budget_and_decodes_come_first() -> None:
    sched = make(budget=16)
    a, b = seq("a", 10), seq("b", 10, first_token=100)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert plan_sizes(plan) == {"a": 10, "b": 6}  # b is chunked by the budget
    assert [c.completes_sequence for c in plan.chunks] == [True, False]
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan_sizes(plan) == {"a": 1, "b": 4}  # a decodes, b finishes its prompt
    assert [c.completes_sequence for c in plan.chunks] == [True, True]


def test_max_num_seqs_limits_admission() -> None:
    sched = make(max_seqs=2)
    for i in range(3):
        sched.add(seq(f"s{i}", 3, first_token=10 * i + 1))
    plan = sched.schedule()
    assert sorted(plan_sizes(plan)) == ["s0", "s1"]
    assert [s.request_id for s in sched.waiting] == ["s2"]


def test_prefix_hit_skips_cached_blocks_but_leaves_one_token() -> None:
    sched = make()
    first = seq("first", 9)
    sched.add(first)
    run_step(sched, sched.schedule())
    sched.finish(first)
    same = seq("same", 9)  # identical prompt: 2 full blocks cached
    sched.add(same)
    plan = sched.schedule()
    assert plan_sizes(plan) == {"same": 1}
    assert same.num_cached_prompt_tokens == 8
    exact = seq("exact", 8)  # prompt is exactly the cached blocks: the last block is recomputed
    sched.add(exact)
    plan = sched.schedule()
    assert plan_sizes(plan)["exact"] == 4
    assert exact.num_cached_prompt_tokens == 4


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    sched = make(num_blocks=4, budget=64)
    old, new = seq("old", 8), seq("new", 7, first_token=50)  # 2 blocks each: the pool is full
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())
    assert sched.blocks.num_free_blocks == 0
    plan = sched.schedule()  # old needs a third block: new is preempted
    assert [s.request_id for s in plan.preempted] == ["new"]
    assert plan_sizes(plan) == {"old": 1}
    assert new.status is SequenceStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    assert sched.waiting[0] is new
    sched.finish(old)
    plan = sched.schedule()  # new is recomputed from prompt plus output; its first block is still cached
    assert new.token_ids == [50, 51, 52, 53, 54, 55, 56, 7]
    assert plan_sizes(plan) == {"new": 4}
    assert new.num_computed_tokens == 4 and new.num_preemptions == 1


def test_a_lone_sequence_that_cannot_grow_preempts_itself_without_losing_blocks() -> None:
    sched = make(num_blocks=2, budget=64)
    only = seq("only", 8)
    sched.add(only)
    run_step(sched, sched.schedule())
    plan = sched.schedule()
    assert plan.is_empty and [s.request_id for s in plan.preempted] == ["only"]
    assert sched.blocks.num_free_blocks == 2


def test_every_block_returns_after_finish_and_abort() -> None:
    sched = make(num_blocks=16, budget=8)
    seqs = [seq(f"s{i}", 5 + i, first_token=20 * i + 1) for i in range(4)]
    for s in seqs:
        sched.add(s)
    for _ in range(6):
        run_step(sched, sched.schedule())
    for s in seqs:  # running, chunked or still waiting: finish() must release all of them
        sched.finish(s)
    assert not sched.has_work()
    assert sched.blocks.pool.num_used_blocks == 0
    assert sched.blocks.num_free_blocks == 16
