"""The orchestrator's tokenizer, rebuilt from a real worker's GetModelInfo: the same ids as the
worker's transformers tokenizer for text and chat, without importing torch; a model without a
tokenizer says so."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.orchestrator.tokenizer import NoChatTemplateError, NoTokenizerError, PromptTokenizer
from tandem.orchestrator.worker_client import WorkerClient
from tandem.proto import tandem_pb2 as pb

NUM_BLOCKS, BLOCK_SIZE = 16, 16
SMOLLM2_BYTES_PER_BLOCK = 737280  # float32, 16-token blocks
TEXTS = ["Hello world", "  two  spaces\nand a newline", "héllo wörld 日本語 🙂", "<|im_start|>user", "x" * 300]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3? Answer in 日本語."},
]


def model_info(address: str) -> pb.ModelInfo:
    """Through the orchestrator's own client, whose channel allows the tokenizer's size."""

    async def fetch() -> pb.ModelInfo:
        client = WorkerClient(address)
        try:
            return await client.model_info()
        finally:
            await client.close()

    return asyncio.run(fetch())


@pytest.fixture(scope="module")
def workers(start_worker, tiny_llama) -> tuple:
    """The embedded SmolLM2 and a tiny Llama without a tokenizer, started at once."""
    return start_worker.all(
        start_worker.launch("generation", "--kv-cache-bytes", str(NUM_BLOCKS * SMOLLM2_BYTES_PER_BLOCK),
                            "--device", "cpu", "--dtype", "float32", "--block-size", str(BLOCK_SIZE)),
        start_worker.launch("generation", "--model", str(tiny_llama[0]), "--device", "cpu", "--dtype", "float32",
                            "--block-size", "4", "--kv-cache-bytes", str(64 * 2048)),
    )


@pytest.fixture(scope="module")
def smollm2_info(workers) -> pb.ModelInfo:
    return model_info(workers[0].address)


@pytest.fixture(scope="module")
def tokenizer(smollm2_info: pb.ModelInfo) -> PromptTokenizer:
    return PromptTokenizer.from_model_info(smollm2_info)


def test_model_info_describes_the_worker(smollm2_info, smollm2, tokenizer) -> None:
    assert smollm2_info.api_version == 1 and smollm2_info.model
    assert smollm2_info.block_size == BLOCK_SIZE
    assert smollm2_info.max_model_len == NUM_BLOCKS * BLOCK_SIZE  # the KV cache bounds it
    assert smollm2_info.vocab_size == smollm2.config.vocab_size
    assert list(smollm2_info.eos_token_ids) == sorted(smollm2.eos_token_ids)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(smollm2_info.tokenizer_files)
    assert tokenizer.model == smollm2_info.model
    assert tokenizer.max_model_len == NUM_BLOCKS * BLOCK_SIZE
    assert tokenizer.eos_token_ids == tuple(sorted(smollm2.eos_token_ids))


def test_encode_gives_the_worker_tokenizer_ids(tokenizer, smollm2) -> None:
    for text in TEXTS:
        assert tokenizer.encode(text) == smollm2.tokenizer(text)["input_ids"], text
    assert tokenizer.encode("") == []


def test_chat_template_gives_transformers_ids(tokenizer, smollm2) -> None:
    for messages in (MESSAGES[1:2], MESSAGES):
        expected = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected_ids = expected["input_ids"] if hasattr(expected, "keys") else expected
        ids = tokenizer.apply_chat_template(messages)
        assert ids == list(expected_ids)
        assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_decode_round_trips_and_token_strings_are_text(tokenizer) -> None:
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("Hi\nthere")
    assert tokenizer.token_strings(ids) == ["Hi", "\n", "there"]
    assert "".join(tokenizer.token_strings(tokenizer.encode(TEXTS[1]))) == TEXTS[1]


def test_no_chat_template_is_a_clear_error(smollm2_info) -> None:
    info = pb.ModelInfo()
    info.CopyFrom(smollm2_info)
    del info.tokenizer_files["chat_template.jinja"]
    bare = PromptTokenizer.from_model_info(info)
    assert bare.encode("Hello world") == [19556, 905]
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        bare.apply_chat_template(MESSAGES)


def test_rebuilding_and_using_it_never_imports_torch(smollm2_info, tmp_path: Path) -> None:
    info_path = tmp_path / "model_info.bin"
    info_path.write_bytes(smollm2_info.SerializeToString())
    script = f"""
import sys
from tandem.orchestrator.tokenizer import PromptTokenizer
from tandem.proto import tandem_pb2 as pb
assert "torch" not in sys.modules, "import"
tokenizer = PromptTokenizer.from_model_info(pb.ModelInfo.FromString(open({str(info_path)!r}, "rb").read()))
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "hi"}}])
tokenizer.decode(tokenizer.encode("hello") + ids), tokenizer.token_strings(ids)
assert "torch" not in sys.modules, "use"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_model_without_tokenizer_has_no_files_and_a_clear_error(workers) -> None:
    info = model_info(workers[1].address)
    assert dict(info.tokenizer_files) == {}
    assert info.vocab_size == 160 and info.block_size == 4 and info.max_model_len == 64 * 4
    with pytest.raises(NoTokenizerError, match="has no tokenizer"):
        PromptTokenizer.from_model_info(info)


def test_no_token_stands_for_more_characters_than_max_token_chars(tokenizer, smollm2) -> None:
    """The bound the app refuses over-long texts by, before tokenizing them, is a true bound."""
    longest = max(len(tokenizer.decode([token_id])) for token_id in range(smollm2.config.vocab_size))
    assert 1 < longest <= tokenizer.max_token_chars
