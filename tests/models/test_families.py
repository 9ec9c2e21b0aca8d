"""Each family against transformers: a tiny random HF model, its state_dict loaded into ours, two
prompts prefilled in one paged batch, then greedy decode steps, logits compared at every step."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from tandem.kernels.interface import AttentionMetadata, ForwardContext
from tandem.kernels.torch_reference import TorchReferenceBackend
from tandem.models.decoder import DecoderForCausalLM, head_dim_of
from tandem.models.errors import UnsupportedArchitectureError, WeightFileError
from tandem.models.registry import model_class_for

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    attn_implementation="eager",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so that the scaling bites at head_dim 16
}
FAMILIES = {
    "llama3_untied": lambda: LlamaConfig(
        **TINY, architectures=["LlamaForCausalLM"], rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False
    ),
    "llama_tied": lambda: LlamaConfig(**TINY, architectures=["LlamaForCausalLM"], tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY, architectures=["MistralForCausalLM"], sliding_window=4096),
    "qwen2_bias": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),  # no architectures: model_type
    "qwen3_qk_norm": lambda: Qwen3Config(
        **TINY, architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=True
    ),
}
BLOCK_SIZE = 4
NUM_DECODE_STEPS = 4
ATOL = 1e-4


def random_hf_model(config: PretrainedConfig) -> torch.nn.Module:
    """HF initialises biases to 0 and norms to 1; perturb everything so each weight matters."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


class PagedRunner:
    """Drives our model over a block-major paged KV cache, as the model runner would."""

    def __init__(self, model: DecoderForCausalLM, config: PretrainedConfig, max_len: int, num_seqs: int) -> None:
        head_dim = head_dim_of(config)
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        num_blocks = blocks_per_seq * num_seqs + 3
        shape = (num_blocks, config.num_hidden_layers, 2, BLOCK_SIZE, config.num_key_value_heads, head_dim)
        self.kv = torch.full(shape, 1.0e4)  # stale garbage: unwritten slots must never count
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        self.block_tables = perm[: blocks_per_seq * num_seqs].view(num_seqs, blocks_per_seq).to(torch.int32)
        self.model = model
        self.backend = TorchReferenceBackend()
        self.lens = [0] * num_seqs

    def step(self, new_tokens: list[list[int]]) -> list[torch.Tensor]:
        """Append new_tokens[i] to sequence i; returns each sequence's logits [len(new_tokens[i]), vocab]."""
        ids, positions, slots = [], [], []
        for i, tokens in enumerate(new_tokens):
            for pos in range(self.lens[i], self.lens[i] + len(tokens)):
                positions.append(pos)
                slots.append(int(self.block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
            ids.extend(tokens)
            self.lens[i] += len(tokens)
        query_lens = [len(t) for t in new_tokens]
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
            seq_lens=torch.tensor(self.lens, dtype=torch.int32),
            block_tables=self.block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(self.lens),
            block_size=BLOCK_SIZE,
        )
        layers = tuple(self.kv[:, i] for i in range(self.kv.shape[1]))
        ctx = ForwardContext(backend=self.backend, meta=meta, kv_caches=layers)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), ctx)
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(query_lens))


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family: str) -> None:
    config = FAMILIES[family]()
    hf = random_hf_model(config)
    ours = model_class_for(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    prompts = [torch.randint(config.vocab_size, (11,)).tolist(), torch.randint(config.vocab_size, (5,)).tolist()]
    runner = PagedRunner(ours, config, max_len=len(prompts[0]) + NUM_DECODE_STEPS, num_seqs=2)
    # Prefill both prompts in one batch: every position's logits must match.
    for seq, got in zip(prompts, runner.step(prompts)):
        torch.testing.assert_close(got, hf_logits(hf, seq), atol=ATOL, rtol=0)
    for _ in range(NUM_DECODE_STEPS):
        next_tokens = [[int(hf_logits(hf, seq)[-1].argmax())] for seq in prompts]
        prompts = [seq + tok for seq, tok in zip(prompts, next_tokens)]
        for seq, got in zip(prompts, runner.step(next_tokens)):
            torch.testing.assert_close(got[0], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_transformers() -> None:
    """A prompt prefilled in two chunks, the second continuing the cached first, next to a decode."""
    config = FAMILIES["qwen3_qk_norm"]()
    hf = random_hf_model(config)
    ours = model_class_for(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    long, short = torch.randint(config.vocab_size, (13,)).tolist(), torch.randint(config.vocab_size, (3,)).tolist()
    runner = PagedRunner(ours, config, max_len=len(long), num_seqs=2)
    runner.step([long[:6], short])
    got_long, got_short = runner.step([long[6:], [7]])
    torch.testing.assert_close(got_long, hf_logits(hf, long)[6:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_short[0], hf_logits(hf, short + [7])[-1], atol=ATOL, rtol=0)


def test_missing_weight_is_named() -> None:
    config = FAMILIES["llama3_untied"]()
    weights = dict(random_hf_model(config).state_dict())
    del weights["model.layers.1.self_attn.k_proj.weight"]
    del weights["lm_head.weight"]
    with pytest.raises(WeightFileError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight") as err:
        model_class_for(config)(config).load_weights(weights.items())
    assert "lm_head.weight" in str(err.value)


def test_unknown_weight_is_named_and_inv_freq_ignored() -> None:
    config = FAMILIES["llama_tied"]()
    weights = dict(random_hf_model(config).state_dict())
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    model_class_for(config)(config).load_weights(weights.items())  # tied: lm_head.weight may be absent
    weights["model.layers.0.self_attn.mystery.weight"] = torch.ones(8)
    with pytest.raises(WeightFileError, match="mystery"):
        model_class_for(config)(config).load_weights(weights.items())


def test_unsupported_architecture_is_named() -> None:
    config = LlamaConfig(**TINY, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM") as err:
        model_class_for(config)
    assert "LlamaForCausalLM" in str(err.value) and "Qwen3ForCausalLM" in str(err.value)


def test_mistral_warns_that_attention_is_full(caplog: pytest.LogCaptureFixture) -> None:
    config = FAMILIES["mistral"]()
    config.max_position_embeddings = 32768
    with caplog.at_level(logging.WARNING, logger="tandem.models.mistral"):
        model_class_for(config)(config)
    assert "sliding_window" in caplog.text


# -- end to end: saved as safetensors, loaded back by path, generated through the engine ---------

GENERATE_PROMPTS = [[3, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15], [100]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_checkpoint_generates_transformers_greedy_tokens(family: str, tmp_path) -> None:
    from tandem.workers import LLM, SamplingParams

    hf = random_hf_model(FAMILIES[family]())
    shard = {"max_shard_size": "40KB"} if family == "llama3_untied" else {}  # one family sharded
    hf.save_pretrained(tmp_path, safe_serialization=True, **shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)

    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", show_progress=False)
    outputs = llm.generate(GENERATE_PROMPTS, SamplingParams(max_tokens=12))
    for prompt, out in zip(GENERATE_PROMPTS, outputs):
        with torch.inference_mode():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        assert out.token_ids == expected.tolist(), family
    assert llm.engine.pool.num_used_blocks == 0
