"""Sampler: greedy, seeded sampling, filters, penalties and logprobs on small hand-built logits."""
from __future__ import annotations

import math

import pytest
import torch

from tandem.workers.sampler import Sampler, SamplingInput, make_generator
from tandem.workers.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 32


def _row(
    params: SamplingParams,
    *,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    seed: int | None = None,
) -> SamplingInput:
    generator = None if params.greedy else make_generator(seed, CPU)
    return SamplingInput(params, prompt, output, generator)


def _logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed))  # [n, V]


def _draw_sequence(
    logits_row: torch.Tensor, others: list[tuple[torch.Tensor, SamplingInput]], position: int, steps: int
) -> list[int]:
    """Tokens a seed-7 row draws over `steps` calls while sitting at `position` among `others`."""
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    target = _row(params, seed=7)
    batch = list(others)
    batch.insert(position, (logits_row, target))
    logits = torch.stack([lg for lg, _ in batch])
    rows = [row for _, row in batch]
    return [Sampler()(logits, rows).token_ids[position] for _ in range(steps)]


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    out = Sampler()(logits, [_row(SamplingParams()) for _ in range(8)])
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_ties_pick_lowest_index() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = logits[0, 9] = 3.0
    assert Sampler()(logits, [_row(SamplingParams())]).token_ids == [5]


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    target = _logits(1, seed=1)[0]
    alone = _draw_sequence(target, [], 0, steps=30)
    assert alone == _draw_sequence(target, [], 0, steps=30)
    others = [
        (_logits(1, seed=2)[0], _row(SamplingParams(temperature=1.0), seed=3)),
        (_logits(1, seed=3)[0], _row(SamplingParams())),
        (_logits(1, seed=4)[0], _row(SamplingParams(temperature=1.5, min_p=0.1, top_p=0.5), seed=None)),
        (
            _logits(1, seed=5)[0],
            _row(SamplingParams(temperature=0.7, frequency_penalty=1.0), output=(1, 2), seed=9),
        ),
    ]
    assert _draw_sequence(target, others, 0, steps=30) == alone
    assert _draw_sequence(target, others[::-1], 2, steps=30) == alone
    assert _draw_sequence(target, others, 4, steps=30) == alone


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: 40 draws coincide with probability 32**-40
    params = SamplingParams(temperature=1.0)
    draws = {}
    for seed in (1, 2):
        row = _row(params, seed=seed)
        draws[seed] = [Sampler()(logits, [row]).token_ids[0] for _ in range(40)]
    assert draws[1] != draws[2]


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)]
)
def test_tight_filter_equals_greedy(params: SamplingParams) -> None:
    logits = _logits(16, seed=11)
    rows = [_row(params, seed=i) for i in range(16)]
    for _ in range(5):
        assert Sampler()(logits, rows).token_ids == torch.argmax(logits, dim=-1).tolist()


def test_top_k_keeps_only_the_k_best() -> None:
    logits = _logits(1, seed=12)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    row = _row(SamplingParams(temperature=5.0, top_k=3), seed=0)
    seen = {Sampler()(logits, [row]).token_ids[0] for _ in range(300)}
    assert seen == allowed


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 needs the first two tokens, 0.85 three.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    for top_p, allowed in ((0.7, {0, 1}), (0.85, {0, 1, 2}), (0.5, {0})):
        row = _row(SamplingParams(temperature=1.0, top_p=top_p), seed=1)
        seen = {Sampler()(logits, [row]).token_ids[0] for _ in range(400)}
        assert seen == allowed, top_p


def test_min_p_removes_low_probability_tokens() -> None:
    # probs relative to the max: 1, 0.5, 0.25, 0.05, 0.01 -> min_p 0.2 keeps the first three.
    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.25), math.log(0.05), math.log(0.01)]])
    row = _row(SamplingParams(temperature=1.0, min_p=0.2), seed=5)
    seen = {Sampler()(logits, [row]).token_ids[0] for _ in range(500)}
    assert seen == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    # token 0 seen in the prompt: 2.0 / 2 = 1.0 < 1.5 -> argmax moves to 1.
    row = _row(SamplingParams(repetition_penalty=2.0), prompt=(0,))
    assert Sampler()(logits, [row]).token_ids == [1]
    # all positive tokens seen; token 2 (negative) seen too: -1.0 * 2 = -2.0 < -1.2.
    flat = torch.tensor([[-1.0, -1.2, -3.0, -3.0]])
    row = _row(SamplingParams(repetition_penalty=2.0), output=(0,))
    assert Sampler()(flat, [row]).token_ids == [1]
    assert Sampler()(flat, [_row(SamplingParams())]).token_ids == [0]


def test_frequency_penalty_scales_with_count() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    once = _row(SamplingParams(frequency_penalty=0.8), output=(0,))  # 3.0 - 0.8 = 2.2 > 2.0
    twice = _row(SamplingParams(frequency_penalty=0.8), output=(0, 0))  # 3.0 - 1.6 = 1.4 < 2.0
    prompt_only = _row(SamplingParams(frequency_penalty=2.0), prompt=(0, 0, 0))  # prompt not counted
    assert Sampler()(logits.repeat(3, 1), [once, twice, prompt_only]).token_ids == [0, 1, 0]


def test_presence_penalty_is_flat() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    once = _row(SamplingParams(presence_penalty=1.5), output=(0,))  # 3.0 - 1.5 = 1.5 < 2.0
    small = _row(SamplingParams(presence_penalty=0.5), output=(0, 0, 0, 0))  # 2.5: count ignored
    boost = _row(SamplingParams(presence_penalty=-2.0), output=(1,))  # 2.0 + 2.0 = 4.0 > 3.0
    assert Sampler()(logits.repeat(3, 1), [once, small, boost]).token_ids == [1, 0, 1]


def test_penalties_leave_other_rows_and_input_untouched() -> None:
    logits = _logits(2, seed=21)
    before = logits.clone()
    best = int(torch.argmax(logits[1]))
    penalized = SamplingParams(presence_penalty=2.0, repetition_penalty=3.0)
    rows = [_row(SamplingParams()), _row(penalized, output=(best,))]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == int(torch.argmax(logits[0]))
    assert torch.equal(logits, before)


def test_logprobs_come_from_raw_logits() -> None:
    logits = _logits(3, seed=31)
    raw = torch.log_softmax(logits, dim=-1)  # [3, V]
    rows = [
        _row(SamplingParams(logprobs=5, presence_penalty=2.0), output=(int(torch.argmax(logits[0])),)),
        _row(SamplingParams(temperature=2.0, logprobs=0), seed=4),
        _row(SamplingParams(logprobs=None)),
    ]
    out = Sampler()(logits, rows)
    assert out.logprobs[2] is None
    for i in (0, 1):
        entry = out.logprobs[i]
        assert entry is not None and entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(raw[i, entry.token_id].item(), abs=1e-5)
    assert out.logprobs[1].top == ()
    top = out.logprobs[0].top
    assert len(top) == 5
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert top[0][0] == int(torch.argmax(logits[0]))  # raw best, though the penalty moved the choice
    assert out.token_ids[0] != top[0][0]
    for token, lp in top:
        assert lp == pytest.approx(raw[0, token].item(), abs=1e-5)


def test_temperature_one_matches_softmax() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0, -2.0, 0.2]])
    draws = 8000
    generator = make_generator(1234, CPU)
    row = SamplingInput(SamplingParams(temperature=1.0), (), (), generator)  # one stream, many rows
    out = Sampler()(logits.repeat(draws, 1), [row] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).float()
    expected = torch.softmax(logits[0], dim=-1) * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 24.3  # df 7, p = 0.001


def test_sampled_row_without_generator_is_rejected() -> None:
    row = SamplingInput(SamplingParams(temperature=1.0), (), (), None)
    with pytest.raises(ValueError):
        Sampler()(_logits(1), [row])


def test_top_p_nucleus_wider_than_the_candidates_falls_back_to_the_whole_vocabulary() -> None:
    from tandem.workers.sampler import TOP_P_CANDIDATES

    vocab = 4 * TOP_P_CANDIDATES
    logits = -torch.arange(vocab, dtype=torch.float32).unsqueeze(0) * 1e-4  # nearly flat, no ties
    probs = torch.softmax(logits[0], dim=-1)
    nucleus = int(((torch.cumsum(probs, 0) - probs) < 0.5).sum())  # tokens top_p=0.5 keeps
    assert nucleus > TOP_P_CANDIDATES
    row = _row(SamplingParams(temperature=1.0, top_p=0.5), seed=3)
    sampler = Sampler()
    seen = {sampler(logits, [row]).token_ids[0] for _ in range(3000)}
    assert max(seen) < nucleus
    assert len(seen) > TOP_P_CANDIDATES  # the draw reached beyond the first candidates
