"""The sampler against transformers' own logits processors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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


# -- every setting the sampler accepts runs; every other is refused where it is made ---------

VOCAB = 50


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("seed", False),
    ],
)
def test_settings_the_sampler_cannot_run_are_refused_when_made(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"Sampling settings out of range: {field}="):
        params(**{field: value})


def test_a_top_k_past_the_vocabulary_keeps_every_token() -> None:
    logits = torch.randn(1, VOCAB) * 3
    every = BatchSampler([params(top_k=0)], [[]], VOCAB, torch.device("cpu")).warp(logits)
    for top_k in (VOCAB, VOCAB + 1, 2**63, 2**70):
        sampler = BatchSampler([params(top_k=top_k)], [[]], VOCAB, torch.device("cpu"))
        assert torch.equal(sampler.warp(logits), every)


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_every_64_bit_seed_seeds_a_generator(seed: int) -> None:
    logits = torch.randn(1, VOCAB)
    draws = [
        BatchSampler([params(temperature=1.0, seed=seed)], [[]], VOCAB, torch.device("cpu"))
        .sample(logits)
        .item()
        for _ in range(2)
    ]
    assert draws[0] == draws[1]


SAMPLED_CASES: list[tuple[float, float]] = []


@settings(max_examples=200, deadline=None)
@given(
    temperature=st.one_of(
        st.sampled_from([0.0, 1e-45, 1e-40, 1e-37, 1e-300]),
        st.floats(min_value=0.0, max_value=5.0, exclude_min=True, allow_subnormal=True),
    ),
    penalty=st.floats(min_value=0.0, max_value=10.0, exclude_min=True, allow_subnormal=True),
    top_k=st.integers(min_value=0, max_value=2**80),
    top_p=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_every_accepted_setting_samples_a_token_the_mask_allows(
    temperature: float, penalty: float, top_k: int, top_p: float, seed: int
) -> None:
    """Property: tiny temperatures and penalties (down to subnormal floats), huge top_k and
    any 64-bit seed: sampling never fails and never leaves the grammar's mask, beside a
    plain row in the same batch."""
    p = params(
        temperature=temperature, repetition_penalty=penalty, top_k=top_k, top_p=top_p, seed=seed
    )
    sampler = BatchSampler([p, params()], [[1, 2, 3], [4]], VOCAB, torch.device("cpu"))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(seed % 1000)) * 5
    allowed = torch.zeros(2, VOCAB, dtype=torch.bool)
    allowed[:, ::3] = True
    for _ in range(3):
        chosen = sampler.sample(logits, allowed=allowed)
        assert allowed[0, chosen[0]]
        assert allowed[1, chosen[1]]
    SAMPLED_CASES.append((temperature, penalty))


def test_the_sampling_property_tried_tiny_values() -> None:
    if not SAMPLED_CASES:
        pytest.skip("run together with the property above")
    assert len(SAMPLED_CASES) >= 100
    assert any(0 < t < 1e-30 for t, _ in SAMPLED_CASES)
