"""The embedded SmolLM2 through Tandem gives transformers' greedy tokens, however it is batched,
chunked, cached or preempted, and every block comes back to the pool."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from tandem.kernels import cpu_attention, cpu_fused, cpu_grid_linear, native_build
from tandem.kernels.interface import BackendKind
from tandem.models.layers import PrepackedWeight
from tandem.models.loader import load_model
from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine
from tandem.workers.llm import LLM
from tandem.workers.sampling_params import SamplingParams

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea and the wind. The waves",
    "A long time ago, in a small village at the foot of the mountains, there lived an old clockmaker who "
    "repaired every clock in the valley. Each morning he opened his shop at dawn, lit a small lamp, and "
    "listened to the ticking of a hundred clocks at once. One winter day a stranger arrived carrying a "
    "clock that had no hands, and asked him to make it tell the time again. The clockmaker",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(hf_smollm2, smollm2) -> dict[str, list[int]]:
    """transformers' greedy continuation of each prompt, generated alone (no padding)."""
    tokens = {}
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2.tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            out = hf_smollm2.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens[prompt] = out[0, ids.shape[1] :].tolist()
    return tokens


def assert_matches(outputs, reference) -> None:
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == reference[prompt], f"mismatch for prompt {prompt[:30]!r}"


def test_batch_submitted_together_is_token_identical_to_transformers(make_llm, reference) -> None:
    llm = make_llm()
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    assert_matches(outputs, reference)
    assert all(len(o.token_ids) == NEW_TOKENS or o.token_ids[-1] in llm.engine.eos_token_ids for o in outputs)
    assert outputs[0].text == llm.tokenizer.decode(outputs[0].token_ids, skip_special_tokens=True)
    assert llm.engine.pool.num_used_blocks == 0


def test_each_prompt_alone_equals_the_mixed_batch(make_llm, reference) -> None:
    llm = make_llm()
    alone = [llm.generate(p, SamplingParams(max_tokens=NEW_TOKENS))[0] for p in PROMPTS]
    assert_matches(alone, reference)


def test_chunked_prefill_small_blocks_and_few_slots_give_the_same_tokens(make_llm, reference) -> None:
    llm = make_llm(block_size=4, num_blocks=256, max_num_batched_tokens=24, max_num_seqs=3)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    assert_matches(outputs, reference)
    assert llm.engine.pool.num_used_blocks == 0


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(make_llm, reference) -> None:
    llm = make_llm(num_blocks=12)  # the long prompt alone fits; all four together do not
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    assert llm.engine.num_preemptions > 0
    assert_matches(outputs, reference)
    assert llm.engine.pool.num_used_blocks == 0
    assert llm.engine.pool.num_free_blocks == 12


def test_a_shared_prefix_is_computed_once_and_gives_identical_tokens(make_llm, reference) -> None:
    llm = make_llm()
    engine = llm.engine
    story = PROMPTS[3]
    first = llm.generate(story, SamplingParams(max_tokens=NEW_TOKENS))[0]
    assert first.num_cached_tokens == 0
    before = engine.num_prompt_tokens_computed
    second = llm.generate(story, SamplingParams(max_tokens=NEW_TOKENS))[0]
    computed = engine.num_prompt_tokens_computed - before
    num_prompt = second.num_prompt_tokens
    assert second.num_cached_tokens == (num_prompt - 1) // 16 * 16  # every full block but the last token's
    assert computed == num_prompt - second.num_cached_tokens
    assert second.token_ids == first.token_ids == reference[story]

    longer = story + " smiled and said:"
    third = llm.generate(longer, SamplingParams(max_tokens=8))[0]
    assert third.num_cached_tokens >= (num_prompt // 16) * 16 - 16
    fresh = make_llm().generate(longer, SamplingParams(max_tokens=8))[0]
    assert fresh.num_cached_tokens == 0
    assert third.token_ids == fresh.token_ids


@pytest.fixture
def without_c_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """No C compiler and an empty kernel cache, as on a machine without one; the session's kernels
    are loaded again afterwards."""
    libraries = (cpu_grid_linear._library, cpu_attention.library, cpu_fused.library)
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv(native_build.CACHE_DIR_ENV, str(tmp_path))
    for library in libraries:
        library.cache_clear()
    yield
    monkeypatch.undo()
    for library in libraries:
        library.cache_clear()


def test_without_the_c_kernels_the_torch_paths_give_the_same_tokens(
    without_c_kernels: None, reference, caplog: pytest.LogCaptureFixture
) -> None:
    """The fallback a machine without a C compiler (or AVX-512) runs: float32 weights, the torch
    reference attention and the torch formulas of the small ops, still token-exact."""
    with caplog.at_level(logging.WARNING, logger="tandem.kernels.native_build"):
        loaded = load_model(None, dtype=torch.float32, device=torch.device("cpu"), show_progress=False)
        config = EngineConfig(cache=CacheConfig(num_bytes=64 << 20))
        llm = LLM.from_engine(LLMEngine(loaded, config, torch.device("cpu")))
    assert "could not build cpu_grid_linear.c" in caplog.text and "could not build cpu_attention.c" in caplog.text
    assert all(m.grid_weight is None for m in loaded.model.modules() if isinstance(m, PrepackedWeight))
    assert llm.engine.runner.backend.kind is BackendKind.TORCH_REFERENCE
    assert not cpu_fused.available(torch.zeros(1))
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    assert_matches(outputs, reference)
    assert llm.engine.pool.num_used_blocks == 0
