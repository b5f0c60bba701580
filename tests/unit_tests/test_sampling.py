"""The sampler against transformers' own logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_synthia._sampling import BatchSampler, SamplingParams


def params(**kw) -> SamplingParams:
    base = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1, "seed": 0}
    return SamplingParams(**{**base, **kw})


@pytest.mark.parametrize(
    "p",
    [
        params(),
        params(top_k=0, top_p=0.5, temperature=1.3),
        params(top_k=3, top_p=1.0, repetition_penalty=1.0),
        params(top_k=1),
    ],
)
def test_penalty_and_warping_match_transformers(p: SamplingParams) -> None:
    torch.manual_seed(1)
    vocab = 100
    prompt = [1, 5, 5, 9, 42]
    logits = torch.randn(1, vocab) * 3
    sampler = BatchSampler([p], [prompt], vocab, torch.device("cpu"))
    ours = sampler.warp(sampler.penalise(logits.clone()))
    ids = torch.tensor([prompt])
    theirs = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits.clone())
    theirs = TemperatureLogitsWarper(p.temperature)(ids, theirs)
    if p.top_k:
        theirs = TopKLogitsWarper(p.top_k)(ids, theirs)
    theirs = TopPLogitsWarper(p.top_p)(ids, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept])


def test_rows_keep_their_own_settings() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)
    rows = [params(temperature=0), params(top_k=1), params(top_k=0, top_p=1.0, seed=5)]
    sampler = BatchSampler(rows, [[0], [0], [0]], 4, torch.device("cpu"))
    warped = sampler.warp(logits)
    assert torch.isinf(warped[1]).tolist() == [True, True, True, False]
    assert not torch.isinf(warped[2]).any()
    first = sampler.sample(logits)
    assert first[:2].tolist() == [3, 3]


def test_greedy_is_argmax_after_the_penalty() -> None:
    logits = torch.tensor([[2.0, 2.1, -1.0]])
    sampler = BatchSampler(
        [params(temperature=0, repetition_penalty=1.5)], [[1]], 3, torch.device("cpu")
    )
    assert sampler.sample(logits).tolist() == [0]  # token 1 is in the prompt: 2.1 / 1.5 < 2.0
    assert sampler.sample(logits).tolist() == [1]  # both seen now: 2.0 / 1.5 < 2.1 / 1.5


def test_equal_seeds_draw_equal_tokens() -> None:
    logits = torch.randn(1, 1000)
    draws = []
    for _ in range(2):
        sampler = BatchSampler(
            [params(top_k=0, top_p=1.0, temperature=1.0, seed=123)],
            [[0]],
            1000,
            torch.device("cpu"),
        )
        draws.append([sampler.sample(logits).item() for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_the_penalty_follows_tokens_chosen_in_earlier_steps_beside_unpenalised_rows() -> None:
    """Row 1 (penalty 2) turns away from its own earlier choices; row 0 (no penalty) does not;
    a request that takes row 0 later with a penalty counts its own prompt's tokens."""
    greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    plain, strict = (
        params(**greedy, repetition_penalty=1.0),
        params(**greedy, repetition_penalty=2.0),
    )
    sampler = BatchSampler([plain, strict], [[], []], vocab_size=4, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 2.0, 0.0]] * 2)
    assert sampler.sample(logits).tolist() == [1, 1]
    assert sampler.sample(logits).tolist() == [1, 2]  # 3 / 2 < 2: row 1 leaves token 1
    assert sampler.sample(logits).tolist() == [1, 1]  # both seen now: 1.5 against 1.0
    sampler.assign(0, strict, [1])  # a new request with a penalty, its prompt holds token 1
    assert sampler.sample(logits).tolist() == [2, 1]  # row 0: 1.5 against 2 (its prompt counts)
