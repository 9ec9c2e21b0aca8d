"""Streaming detokenization of one request's output: token ids in, text deltas out.

`IncrementalDetokenizer` owns the text side of a running request: which characters a
streaming client may see now, which are held back, and where a stop string ends the
output. Life cycle: push() per generated token, then finish() once; after a stop string
matches, the output is over (`stopped`) and push() raises.

Why it is incremental: re-decoding the whole output every token costs O(length) per step.
Instead a small window of ids is decoded, split at two offsets (prefix/read): the text of
ids[prefix:read] was already released, the text of ids[prefix:] minus it is new. The prefix
tokens give the tokenizer the context it needs for leading spaces. The window only moves
on once the new text ends in a complete character, since byte-level BPE tokens can split
a multi-byte UTF-8 character (decoded tail U+FFFD).

Stop strings: a stop string may span tokens, so the tail that could still begin one is
held back until later text rules it out; a streaming client never sees any part of it.
"""
from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens that seed the window, for leading-space handling
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they arrive, for streaming."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # The window: ids[:read] were decoded into released or held text; ids[read:] not yet.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._held = ""  # decoded but held back: it may start a stop string
        self._text = ""  # released so far
        self._stopped = False
        self._finished = False

    @property
    def text(self) -> str:
        """All text released so far; after finish() the whole output, cut before a stop string."""
        return self._text

    @property
    def stopped(self) -> bool:
        """A stop string matched; the text ends right before it."""
        return self._stopped

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the newly releasable text ("" while waiting)."""
        if self._stopped or self._finished:
            state = "a stop string matched" if self._stopped else "finish() was called"
            raise RuntimeError(f"push() after {state}")
        if token_id in self._special_ids:
            return ""  # decode(..., skip_special_tokens=True) drops it without a trace
        self._ids.append(token_id)
        new_text = self._decode_new(final=False)
        return self._release(new_text, final=False) if new_text else ""

    def finish(self) -> str:
        """Release everything still held, except the text of a matched stop string."""
        if self._stopped or self._finished:
            self._finished = True
            return ""
        self._finished = True
        return self._release(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, *, final: bool) -> str:
        """Text of the window past the read offset; "" while it ends in half a character."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        # Move the window on and drop what lies before it, so decode cost stays constant.
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return full_text[len(prefix_text) :]

    def _release(self, new_text: str, *, final: bool) -> str:
        """Append decoded text; return the part that can no longer belong to a stop string."""
        buffer = self._held + new_text
        cut = _first_stop(buffer, self._stop)
        if cut is not None:
            self._stopped = True
            released, self._held = buffer[:cut], ""
        else:
            keep = len(buffer) if final else _safe_length(buffer, self._stop, self._max_stop_len)
            released, self._held = buffer[:keep], buffer[keep:]
        self._text += released
        return released


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string in `text` begins, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _safe_length(text: str, stop: Sequence[str], max_stop_len: int) -> int:
    """Length of the head of `text` that no stop string can begin in (`text` holds none whole)."""
    for start in range(max(0, len(text) - max_stop_len + 1), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stop):
            return start
    return len(text)
