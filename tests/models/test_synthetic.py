"""The weightless synthetic model: selected by name, deterministic tokens, real KV bytes, and the
whole engine around it (scheduler, blocks, streaming) unchanged."""
from __future__ import annotations

import pytest
import torch

from tandem.models.errors import WeightFileError
from tandem.models.registry import supported_architectures
from tandem.models.source import SYNTHETIC_MODEL, resolve_model
from tandem.models.synthetic import SYNTHETIC_GEOMETRY, SyntheticForCausalLM
from tandem.workers import LLM, SamplingParams
from tandem.workers.config import CacheConfig
from tandem.workers.sequence import FinishReason

VOCAB = 49152  # the embedded SmolLM2's; ids 1 (BOS) and 2 (EOS, pad) are never generated


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="synthetic", cache=CacheConfig(num_bytes=4 << 20), show_progress=False)


def pool_is_full(llm: LLM) -> bool:
    return llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_resolves_by_name_with_the_embedded_files() -> None:
    source = resolve_model(SYNTHETIC_MODEL)
    assert source.synthetic and source.name == "synthetic"
    assert source.gguf_path == resolve_model(None).gguf_path
    assert "SyntheticForCausalLM" not in supported_architectures()


def test_generates_successor_tokens_skipping_special_ids(llm: LLM) -> None:
    prompts = [[5, 6, 7], [VOCAB - 2], list(range(100, 140))]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=6))
    assert [out.token_ids for out in outputs] == [
        [8, 9, 10, 11, 12, 13],
        [VOCAB - 1, 0, 3, 4, 5, 6],  # wraps around, past BOS (1) and EOS (2)
        [140, 141, 142, 143, 144, 145],
    ]
    assert all(out.finish_reason is FinishReason.LENGTH for out in outputs)
    assert pool_is_full(llm)


def test_sampling_params_do_not_change_the_tokens(llm: LLM) -> None:
    params = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.5, repetition_penalty=1.3, seed=3)
    text_prompt = llm.generate("The capital of France is", SamplingParams(max_tokens=1))[0]
    assert llm.generate([[300, 400]], params)[0].token_ids == [401, 402, 403, 404]
    assert text_prompt.num_prompt_tokens > 1 and text_prompt.text  # tokenizer and detokenizer work
    assert pool_is_full(llm)


def test_stream_and_abort_return_every_block(llm: LLM) -> None:
    stream = llm.stream([1000] * 40, SamplingParams(max_tokens=64))
    first = next(stream)
    assert first.new_token_ids == (1001,)
    assert not pool_is_full(llm)
    stream.close()  # aborts the request
    assert pool_is_full(llm)


def test_kv_cache_holds_the_token_ids(llm: LLM) -> None:
    """What a NIXL transfer of a handed-off prompt would move: every element of a token's key and
    value is that token's id."""
    engine = llm.engine
    prompt = list(range(200, 237))  # 37 tokens: 3 blocks of 16
    engine.add_request("held", prompt, SamplingParams(max_tokens=8), hand_off_kv=True)
    held = None
    while held is None:
        held = next((out.held_kv for out in engine.step() if out.request_id == "held"), None)
    block_size = engine.kv_cache_spec.block_size
    assert engine.kv_cache.shape[1:] == (1, 2, block_size, 1, SYNTHETIC_GEOMETRY["head_dim"])
    cache = engine.kv_cache[list(held.block_ids)]  # [blocks, layers, 2, block_size, heads, dim]
    stored = cache.reshape(len(held.block_ids), 1, 2, block_size, -1)[:, 0].transpose(0, 1)
    stored = stored.reshape(2, -1, SYNTHETIC_GEOMETRY["head_dim"])[:, : len(prompt)]
    expected = torch.tensor(prompt, dtype=cache.dtype)[None, :, None].expand_as(stored)
    assert torch.equal(stored, expected)
    engine.release_blocks(held.block_ids)
    assert pool_is_full(llm)


def test_takes_no_weights(llm: LLM) -> None:
    model = llm.engine.runner.model
    assert isinstance(model, SyntheticForCausalLM)
    model.load_weights([])
    with pytest.raises(WeightFileError, match="model.embed_tokens.weight"):
        model.load_weights([("model.embed_tokens.weight", torch.zeros(1))])
