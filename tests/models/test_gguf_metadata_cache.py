"""The GGUF metadata cache gives what transformers derives from the file itself, is built once
per file and transformers version, and is skipped (not fatal) where it cannot be written."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from tandem.models.gguf_metadata_cache import CACHE_ENV, gguf_metadata_dir
from tandem.models.source import embedded_gguf_path, load_config, load_tokenizer, resolve_model

TEXTS = ["Hello world", "  two  spaces\nand a newline", "héllo wörld 日本語 🙂", "<|im_start|>user"]


def test_cached_config_and_tokenizer_equal_the_gguf_files_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             hf_smollm2_tokenizer) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    gguf = embedded_gguf_path()
    folder = gguf_metadata_dir(gguf)
    assert folder is not None and folder.parent.parent == tmp_path and (folder / "tokenizer.json").is_file()
    assert gguf_metadata_dir(gguf) == folder  # found, not rebuilt

    direct = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name, "local_files_only": True}
    source = resolve_model(None)
    def settings(config) -> dict:
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # where it was read from

    assert settings(load_config(source)) == settings(AutoConfig.from_pretrained(**direct))
    cached, original = load_tokenizer(source), hf_smollm2_tokenizer  # AutoTokenizer of the same file (conftest.py)
    for text in TEXTS:
        assert cached(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert cached.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_an_unwritable_cache_falls_back_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    assert gguf_metadata_dir(embedded_gguf_path()) is None
    assert load_config(resolve_model(None)).model_type == "llama"
