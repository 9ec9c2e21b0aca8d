"""Request handling on the real embedded model: streaming, abort, stops, seeds, logprobs and bad
input. Every test ends with every block back in the pool and the engine still serving."""
from __future__ import annotations

import pytest

from tandem.workers.errors import InvalidRequestError
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.sequence import FinishReason

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(make_llm):
    return make_llm(num_blocks=64)


@pytest.fixture(autouse=True)
def no_leaks(llm):
    yield
    assert not llm.engine.requests
    assert llm.engine.pool.num_used_blocks == 0


def test_streamed_deltas_add_up_to_the_batch_result(llm) -> None:
    params = SamplingParams(max_tokens=20)
    deltas = list(llm.stream(PROMPT, params))
    whole = llm.generate(PROMPT, params)[0]
    assert "".join(d.new_text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.new_token_ids] == whole.token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert deltas[-1].num_output_tokens == len(whole.token_ids)


def test_closing_a_stream_early_aborts_and_frees_its_blocks(llm) -> None:
    stream = llm.stream(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    next(stream)
    assert llm.engine.pool.num_used_blocks > 0
    stream.close()


def test_abort_mid_decode_finishes_only_that_request(llm) -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine.add_request("keep", PROMPT, params)
    engine.add_request("drop", "Once upon a time", params)
    for _ in range(3):
        engine.step()
    assert engine.abort("drop")
    assert not engine.abort("no-such-request")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["drop"].finish_reason is FinishReason.ABORT
    assert finals["keep"].finish_reason is FinishReason.LENGTH and finals["keep"].num_output_tokens == 12


def test_stop_string_and_stop_token_end_generation(llm) -> None:
    free_run = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    word = free_run.text.split()[1]  # a word the model will produce, not at the very start
    stopped = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, stop=[word]))[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert word not in stopped.text and free_run.text.startswith(stopped.text)
    stop_token = free_run.token_ids[3]
    by_token = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token]))[0]
    assert by_token.finish_reason is FinishReason.STOP
    assert by_token.token_ids == free_run.token_ids[: free_run.token_ids.index(stop_token) + 1]


def test_max_tokens_gives_length(llm) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPT, params)[0].token_ids
    again = llm.generate(PROMPT, params)[0].token_ids
    batched = llm.generate(["Hello there", PROMPT, "Tell me a story"], params)[1].token_ids
    other_seed = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True))
    assert alone == again == batched
    assert other_seed[0].token_ids != alone


def test_logprobs_are_returned_per_token(llm) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.logprob <= 0.0
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token


@pytest.mark.parametrize(
    ("prompt", "params", "field", "words"),
    [
        ("", SamplingParams(), "prompt", "empty"),
        ([], SamplingParams(), "prompt", "empty"),
        ([1, 2, 10**9], SamplingParams(), "prompt", "token ids"),
        ([5] * 5000, SamplingParams(), "prompt", "context"),
    ],
)
def test_bad_input_raises_a_clear_error_and_the_engine_keeps_serving(llm, prompt, params, field, words) -> None:
    with pytest.raises(InvalidRequestError, match=words) as err:
        llm.generate(["Hello", prompt], params)
    assert err.value.field == field
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2))[0].token_ids


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature")],
)
def test_bad_sampling_params_name_the_field(kwargs, field) -> None:
    with pytest.raises(InvalidRequestError, match=field) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_two_open_streams_each_get_all_their_tokens(llm) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = [llm.generate(p, params)[0].token_ids for p in (PROMPT, "Once upon a time")]
    first, second = llm.stream(PROMPT, params), llm.stream("Once upon a time", params)
    got: list[list[int]] = [[], []]
    for _ in range(6):  # interleaved: stepping for one stream must not swallow the other's output
        got[0].extend(next(first).new_token_ids)
        got[1].extend(next(second).new_token_ids)
    assert got == expected
