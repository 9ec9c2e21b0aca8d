"""Tensor parallelism on the CPU (gloo, float32) over the tiny random Llama: two ranks give one
rank's and transformers' greedy tokens and logits under continuous batching, free every block,
leave no process behind, fail fast when a follower dies, and refuse a model that does not split."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig

from tandem.workers.config import CacheConfig
from tandem.workers.kv_cache_sizing import kv_cache_spec
from tandem.workers.llm import LLM
from tandem.workers.model_runner import StepBatch
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.scheduler import ScheduledChunk, SchedulerConfig
from tandem.workers.sequence import Sequence
from tandem.workers.tensor_parallel_wire import TensorParallelError, pack_batch, unpack_batch
from tiny_models import TINY_LLAMA

_rng = torch.Generator().manual_seed(7)
PROMPTS = [torch.randint(0, TINY_LLAMA["vocab_size"], (n,), generator=_rng).tolist() for n in (3, 9, 22, 41)]
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
# Blocks of 4 tokens and 16 tokens a step: the long prompts prefill in chunks while the short
# ones already decode, so steps mix prefill chunks and decodes.
CACHE = CacheConfig(block_size=4, num_bytes=1 << 18)
SCHEDULER = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16)


def make_llm(model_dir: Path, tensor_parallel_size: int) -> LLM:
    return LLM(
        str(model_dir), device="cpu", dtype="float32", cache=CACHE, scheduler=SCHEDULER,
        show_progress=False, tensor_parallel_size=tensor_parallel_size,
    )


def is_running(pid: int) -> bool:
    """True while pid exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, generated alone."""
    model = tiny_llama[1]
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
            for p in PROMPTS
        ]


@pytest.fixture(scope="module")
def tp1(tiny_llama) -> LLM:
    return make_llm(tiny_llama[0], 1)


@pytest.fixture(scope="module")
def tp2(tiny_llama):
    with make_llm(tiny_llama[0], 2) as llm:
        yield llm


def test_two_ranks_give_the_tokens_of_one_rank_and_of_transformers(tp1: LLM, tp2: LLM, reference) -> None:
    steps: list[list[ScheduledChunk]] = []
    runner = tp2.engine.runner
    execute = runner.execute
    runner.execute = lambda chunks: (steps.append(list(chunks)), execute(chunks))[1]
    try:
        two = tp2.generate(PROMPTS, GREEDY)
    finally:
        del runner.execute
    one = tp1.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in two] == [o.token_ids for o in one] == reference
    mixed = [s for s in steps if any(c.num_tokens == 1 for c in s) and any(c.num_tokens > 1 for c in s)]
    assert mixed, "no step mixed decodes with prefill chunks"
    assert tp2.engine.pool.num_used_blocks == 0
    assert tp2.engine.pool.num_free_blocks == tp2.engine.pool.num_blocks


def test_each_rank_caches_its_half_of_the_kv_heads(tp1: LLM, tp2: LLM) -> None:
    assert tp2.engine.kv_cache_spec.num_kv_heads == tp1.engine.kv_cache_spec.num_kv_heads // 2
    assert tp2.engine.kv_cache.shape[-2] == TINY_LLAMA["num_key_value_heads"] // 2


def last_token_logits(llm: LLM, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the last prompt token (prefill) and of one decode step after it, through the
    engine's runner, in blocks borrowed from (and given back to) its pool."""
    engine = llm.engine
    seq = Sequence("logits", tuple(prompt), GREEDY)
    seq.block_ids = engine.pool.allocate(-(-(len(prompt) + 1) // CACHE.block_size))
    try:
        prefill = engine.runner.execute([ScheduledChunk(seq, len(prompt))])
        seq.num_computed_tokens = len(prompt)
        seq.token_ids.append(int(prefill.argmax()))
        decode = engine.runner.execute([ScheduledChunk(seq, 1)])
    finally:
        engine.pool.free(seq.block_ids)
    return prefill[0], decode[0]


def test_two_ranks_give_the_logits_of_one_rank_and_of_transformers(tp1: LLM, tp2: LLM, tiny_llama) -> None:
    prompt = PROMPTS[2]
    one, two = last_token_logits(tp1, prompt), last_token_logits(tp2, prompt)
    for a, b in zip(one, two):
        assert b.shape == (TINY_LLAMA["vocab_size"],)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    ids = torch.tensor([prompt + [int(one[0].argmax())]])
    with torch.inference_mode():
        hf = tiny_llama[1](ids).logits[0, -2:].float()
    torch.testing.assert_close(two[0], hf[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(two[1], hf[1], atol=1e-4, rtol=1e-4)
    assert tp2.engine.pool.num_used_blocks == 0


def test_close_stops_every_follower(tp2: LLM) -> None:
    """Runs last among the tests that share tp2: it closes the group."""
    pids = tp2.engine._tp_group.pids
    assert pids and all(is_running(pid) for pid in pids)
    tp2.close()
    assert not any(is_running(pid) for pid in pids)
    assert not dist.is_initialized()
    with pytest.raises(TensorParallelError, match="closed"):
        tp2.generate(PROMPTS[0], GREEDY)


def test_a_dead_follower_fails_the_next_step_at_once(tiny_llama) -> None:
    with make_llm(tiny_llama[0], 2) as llm:
        (pid,) = llm.engine._tp_group.pids
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1: exited with code -9"):
            llm.generate(PROMPTS, GREEDY)
        assert time.monotonic() - started < 10
        assert llm.engine.pool.num_used_blocks == 0  # the step's requests were aborted
        with pytest.raises(TensorParallelError, match="unusable"):
            llm.generate(PROMPTS[0], GREEDY)
    assert not is_running(pid)
    assert not dist.is_initialized()


def test_kv_heads_that_do_not_divide_are_refused_before_any_process_starts(tmp_path: Path) -> None:
    config = dict(TINY_LLAMA, hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    LlamaConfig(**config, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*num_key_value_heads \(3\)"):
        make_llm(tmp_path, 2)
    assert set(multiprocessing.active_children()) == before
    assert not dist.is_initialized()


def test_kv_cache_spec_counts_the_kv_heads_of_one_rank() -> None:
    config = LlamaConfig(**TINY_LLAMA)
    assert kv_cache_spec(config, 4, torch.float32, 2).num_kv_heads == 1
    with pytest.raises(ValueError, match="num_key_value_heads"):
        kv_cache_spec(config, 4, torch.float32, 4)


@pytest.mark.parametrize("logit_rows", [(2, 3), ()])
def test_a_step_batch_crosses_the_wire_unchanged(logit_rows: tuple[int, ...]) -> None:
    batch = StepBatch(
        token_ids=[5, 6, 7, 9], positions=[0, 1, 2, 7], slot_mapping=[8, 9, 10, 3],
        query_lens=(3, 1), seq_lens=(3, 8), block_table=[[2, 0], [1, 0]], logit_rows=logit_rows,
    )
    assert unpack_batch(*pack_batch(batch)) == batch
