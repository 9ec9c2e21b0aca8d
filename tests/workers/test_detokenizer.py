"""IncrementalDetokenizer against the embedded SmolLM2 tokenizer (byte-level BPE), offline."""
from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from tandem.workers.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nWrite something.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(hf_smollm2_tokenizer) -> PreTrainedTokenizerBase:
    """transformers' tokenizer of the embedded GGUF file (tests/conftest.py)."""
    return hf_smollm2_tokenizer


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """All deltas: one per push (stopping early if a stop string matched), then finish()."""
    deltas = []
    for token_id in ids:
        deltas.append(detok.push(token_id))
        if detok.stopped:
            break
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog. It was, by all accounts, a fine day!",
        "   leading spaces\n\tand a tab,  double  spaces and trailing space ",
        "Hello 👋🏽 世界! Café naïve — ünïcödé façade 🤖🚀 日本語のテキスト, ½ € ©.",
    ],
)
def test_deltas_join_to_decode(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = _ids(tok, text)
    detok = IncrementalDetokenizer(tok, _ids(tok, PROMPT))
    deltas = _stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.stopped


def test_split_characters_are_held_back(tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(tok, " 世界🤖")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case exists: tokens split characters
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.push(i) for i in ids]
    assert "" in deltas
    assert "".join(deltas) + detok.finish() == " 世界🤖"


def test_no_prompt_and_leading_space(tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(tok, " Hello world")
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push(ids[0]) == " Hello"
    assert "".join(detok.push(i) for i in ids[1:]) + detok.finish() == " world"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: PreTrainedTokenizerBase, skip: bool) -> None:
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = _ids(tok, "Sure") + [im_end, im_start] + _ids(tok, " thing.") + [im_end]
    detok = IncrementalDetokenizer(tok, _ids(tok, PROMPT), skip_special_tokens=skip)
    joined = "".join(_stream(detok, ids))
    assert joined == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in joined) is not skip


def test_stop_string_spanning_tokens(tok: PreTrainedTokenizerBase) -> None:
    text = "The answer is 42.\n\nUser: what else?\n\nUser: more"
    stop = "\n\nUser:"
    ids = _ids(tok, text)
    assert not any(stop in tok.decode([i]) for i in ids)  # the stop string spans several tokens
    expected = text[: text.index(stop)]
    detok = IncrementalDetokenizer(tok, _ids(tok, PROMPT), stop=[stop, "never"])
    released = ""
    for token_id in ids:
        released += detok.push(token_id)
        assert expected.startswith(released)  # nothing past the cut, no piece of the stop string
        if detok.stopped:
            break
    assert detok.stopped
    released += detok.finish()
    assert released == detok.text == expected
    with pytest.raises(RuntimeError):
        detok.push(ids[-1])


def test_stop_string_held_back_until_ruled_out(tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(tok, "a b\n\nUse it")
    detok = IncrementalDetokenizer(tok, [], stop=["\n\nUser:"])
    deltas = _stream(detok, ids)
    assert "".join(deltas) == "a b\n\nUse it" and not detok.stopped
    newline_token = next(i for i, t in enumerate(ids) if "\n" in tok.decode([t]))
    assert "\n" not in "".join(deltas[: newline_token + 1])  # held while it might begin the stop


def test_stop_string_inside_one_token(tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(tok, "hello world again")
    detok = IncrementalDetokenizer(tok, [], stop=["wor"])
    assert "".join(_stream(detok, ids)) == detok.text == "hello "
    assert detok.stopped


def test_stop_string_at_first_token(tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(tok, "Hello there")
    detok = IncrementalDetokenizer(tok, _ids(tok, PROMPT), stop=["Hello"])
    assert detok.push(ids[0]) == ""
    assert detok.stopped and detok.finish() == "" and detok.text == ""


def test_earliest_of_several_stop_strings_wins(tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(tok, "one two three four")
    detok = IncrementalDetokenizer(tok, [], stop=["four", "two", "three"])
    assert "".join(_stream(detok, ids)) == "one "


def test_long_generation_decodes_a_small_window(
    tok: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentence = "Streaming detokenization costs the same at token ten and at token ten thousand. 世界 🚀\n"
    ids = _ids(tok, sentence * 150)
    assert len(ids) > 3000
    expected = tok.decode(ids, skip_special_tokens=True)
    widest = 0
    decode = tok.decode

    def recording_decode(token_ids: list[int], **kwargs: object) -> str:
        nonlocal widest
        widest = max(widest, len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(tok, "decode", recording_decode)
    detok = IncrementalDetokenizer(tok, _ids(tok, PROMPT), stop=["never appears"])
    assert "".join(_stream(detok, ids)) == expected
    assert widest <= 12  # the window, never the whole output
