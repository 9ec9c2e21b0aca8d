"""The orchestrator's tokenizer: the worker's own, rebuilt from GetModelInfo, without torch.

The orchestrator applies the chat template and tokenizes once; the workers get token ids. The
tokenizer of a GGUF model lives inside the GGUF file, and transformers reads that only with torch,
which the orchestrator never imports. So a worker, which has the tokenizer loaded, hands out the
files `save_pretrained` writes (ModelInfo.tokenizer_files), and this module loads them with
`PreTrainedTokenizerFast`, which needs only the `tokenizers` library. Built once per model; after
that it is read-only.
"""
from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from tandem.proto import tandem_pb2 as pb



class NoTokenizerError(ValueError):
    """The served model has no tokenizer: it is served on token ids only."""


class NoChatTemplateError(ValueError):
    """The served model's tokenizer has no chat template: chat requests cannot be rendered."""


class PromptTokenizer:
    """Text and chat messages to the token ids a worker would compute itself, and back."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, model: str, max_model_len: int, eos_token_ids: Sequence[int]
    ) -> None:
        self._tokenizer = tokenizer
        self.model = model
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)

    @classmethod
    def from_model_info(cls, info: pb.ModelInfo) -> PromptTokenizer:
        """Load the tokenizer files a worker sent; NoTokenizerError when it sent none."""
        if not info.tokenizer_files:
            raise NoTokenizerError(
                f"model {info.model!r} has no tokenizer: its workers take token ids, not text or chat messages"
            )
        with tempfile.TemporaryDirectory(prefix="tandem-tokenizer-") as folder:
            for name, content in info.tokenizer_files.items():
                if not name or Path(name).name != name or name.startswith("."):
                    raise ValueError(f"model {info.model!r}: refusing tokenizer file name {name!r}")
                (Path(folder) / name).write_bytes(content)
            try:
                tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
            except Exception as error:
                raise ValueError(
                    f"model {info.model!r}: cannot load the tokenizer files {sorted(info.tokenizer_files)}: {error}"
                ) from error
        return cls(tokenizer, info.model, info.max_model_len, list(info.eos_token_ids))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (a vocabulary entry spells each byte or
        character of its text as one symbol), so that a text too long for a context can be told
        without tokenizing it."""
        return max(map(len, self._tokenizer.get_vocab()), default=1)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tokenizer.chat_template)

    def encode(self, text: str) -> list[int]:
        """The ids a worker's engine computes for a text prompt (special tokens as its tokenizer adds them)."""
        if not text:
            return []  # as the engine: an empty prompt is no tokens, not a lone BOS
        return list(self._tokenizer(text)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render chat messages with the model's template, ending in the assistant's turn."""
        if not self.has_chat_template:
            raise NoChatTemplateError(
                f"model {self.model!r} has no chat template: send a completion prompt instead of chat messages"
            )
        rendered = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
        return [int(t) for t in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text, for logprobs ("\\n", not the byte-level "Ċ"); a token that is
        part of a UTF-8 character decodes to U+FFFD."""
        return [self._tokenizer.decode([t]) for t in ids]
