"""Mistral's sliding window in the fast engine, on a tiny checkpoint whose window is 16 tokens.

A query at position p attends to the keys at ``p - sliding_window < j <= p`` (transformers'
``sliding_window_causal_mask_function``). With a 16-token window, prompts of 45 to 100 tokens
are several windows long, so every way the fast engine attends (prefill in one pass or in
several, the decode-shaped prefill of a prompt's rest after a reused prefix, decode steps of one
row or of several at different lengths) must apply the window to agree with the transformers
engine. On the CPU the fast engine runs the plain-torch references (tests/kernel_tests/ checks
the Triton kernels against them, with windows, through Triton's interpreter).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_synthia import ChatSynthia, render_messages
from langchain_synthia import _kernels as K
from langchain_synthia._checkpoint import MISTRAL_SLIDING_WINDOW, read_model_config
from langchain_synthia._fast_model import FastMistral
from langchain_synthia._loading import ModelSettings, get_engine
from langchain_synthia.testing import make_tiny_checkpoint
from tests.helpers import DEVICE

pytestmark = pytest.mark.gpu  # the GPU tier: SYNTHIA_TEST_DEVICE=cuda pytest -m gpu

WINDOW = 16
NEW_TOKENS = 32
LOGITS_REL = 1e-2
"""‖fast - transformers‖ / ‖transformers‖ of a step's logits (fp16 noise: ~4e-3 on the CPU)."""

NEAR_TIE = 2e-3
"""Smallest gap between the best two logits along a prompt's greedy answer (transformers, no
cache). Random tiny weights make near ties, where fp16 noise picks the token: at a gap of 5e-4
transformers' own cached and uncached runs disagree. The prompts are ones without such ties."""

QUESTIONS = [
    "Hi",
    "Tell me about AI",
    "Why is the sky blue?",
    "Hello there. Could you explain to me how a bicycle stays upright when it is moving?",
    "Tell me about AI, and about the people who built it, from the first programs to today.",
    "Tell me a story about a cat who wanted to become an astronaut and trained every day for "
    "years.",
]
"""49 to 70 tokens rendered: 3 to 4 windows."""
DOCUMENTS = " ".join(f"Document {i}: rockets carry payloads to orbit in stages." for i in range(5))
"""A system message: with it, the prompts are 86 to 104 tokens."""
WITH_DOCUMENTS = QUESTIONS[4:]


@pytest.fixture(scope="module")
def window_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint with a 16-token sliding window (reused from $SYNTHIA_TINY_DIR)."""
    root = os.environ.get("SYNTHIA_TINY_DIR")
    folder = Path(root) if root else tmp_path_factory.mktemp("tiny")
    return str(make_tiny_checkpoint(folder / f"tiny-window{WINDOW}", sliding_window=WINDOW))


def chat_of(model: str, engine: str, **options) -> ChatSynthia:
    settings = {"max_tokens": NEW_TOKENS, "temperature": 0, "repetition_penalty": 1.0,
                "stop_at_user_turn": False, "timeout": 60, **options}  # fmt: skip
    return ChatSynthia(model=model, device=DEVICE, engine=engine, **settings)


def engine_of(model: str, engine: str):
    return get_engine(ModelSettings(model=model, device=DEVICE, engine=engine))


@pytest.fixture(scope="module")
def transformers_answers(window_model: str) -> dict[str, str]:
    """The transformers engine's greedy answer to each question, one call at a time (and its
    distance from a near tie, checked)."""
    chat = chat_of(window_model, "transformers")
    engine = chat._engine_for(chat.model, chat.revision)
    conversations = {q: [HumanMessage(q)] for q in QUESTIONS}
    conversations.update(
        {f"docs: {q}": [SystemMessage(DOCUMENTS), HumanMessage(q)] for q in WITH_DOCUMENTS}
    )
    answers = {}
    for name, messages in conversations.items():
        ids = engine.encode(render_messages(messages))
        with torch.inference_mode():
            prompt = torch.tensor([ids], device=engine.model.device)
            answer = engine.model.generate(prompt, max_new_tokens=NEW_TOKENS,
                                           do_sample=False, repetition_penalty=1.0)  # fmt: skip
            logits = engine.model(input_ids=answer).logits[0, len(ids) - 1 : -1].float()
        best = logits.topk(2, dim=-1).values
        gap = float((best[:, 0] - best[:, 1]).min())
        if gap < NEAR_TIE and DEVICE != "cpu":
            pytest.skip(
                f"{name!r}: the tiny model's fp16 logits on {DEVICE} tie ({gap}) on its greedy "
                "path, so greedy equality is checked on the CPU; the logits are compared on "
                "every device (test_logits_match_transformers_past_the_window)"
            )
        assert gap >= NEAR_TIE, f"{name!r}: a near tie ({gap}) on its greedy path; choose another"
        assert 2 * WINDOW < len(ids) <= 110, (name, len(ids))
        answers[name] = chat.invoke(messages).content
    return answers


# -- the definition --------------------------------------------------------------------------


def test_the_window_is_read_from_config_json_as_transformers_reads_it(
    window_model: str, tmp_path: Path
) -> None:
    """16, null (no window) and absent (Mistral's default, 4096), as MistralConfig holds it."""
    from transformers import AutoConfig

    cases = {"given": WINDOW, "null": None, "absent": MISTRAL_SLIDING_WINDOW}
    for name, expected in cases.items():
        folder = tmp_path / name
        shutil.copytree(window_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((folder / "config.json").read_text())
        if name == "null":
            config["sliding_window"] = None
        elif name == "absent":
            del config["sliding_window"]
        (folder / "config.json").write_text(json.dumps(config))
        assert read_model_config(folder).sliding_window == expected, name
        assert AutoConfig.from_pretrained(folder).sliding_window == expected, name


def test_the_tiny_checkpoint_takes_a_window_and_keeps_the_default_build(
    window_model: str, tiny_model: str, tmp_path: Path
) -> None:
    """A window of its own is in the stamp and config.json; the default's stamp is unchanged,
    so checkpoints built before the parameter existed are reused."""
    stamp = json.loads((Path(window_model) / "tiny-checkpoint.json").read_text())
    assert stamp["sliding_window"] == WINDOW
    assert json.loads((Path(window_model) / "config.json").read_text())["sliding_window"] == WINDOW
    default = json.loads((Path(tiny_model) / "tiny-checkpoint.json").read_text())
    assert sorted(default) == ["bits", "format", "group_size", "num_layers", "seed"]
    assert json.loads((Path(tiny_model) / "config.json").read_text())["sliding_window"] == 4096
    for bad in (0, -3, True, 2.5, "16"):
        with pytest.raises(ValueError, match="sliding_window"):
            make_tiny_checkpoint(tmp_path, sliding_window=bad)


@pytest.mark.parametrize("window", [None, 1, 5, 16, 40, 41, 1000])
def test_the_reference_attends_to_what_transformers_masks(window: int | None) -> None:
    """`decode_attention_reference` against attention under transformers' own mask function,
    for each query of a 41-token row: no window, windows shorter than, as long as and longer
    than the row."""
    from transformers.masking_utils import (
        causal_mask_function,
        sliding_window_causal_mask_function,
    )

    visible = sliding_window_causal_mask_function(window) if window else causal_mask_function
    generator = torch.Generator().manual_seed(23)
    heads, kv_heads, dim, length = 4, 2, 16, 41
    k_cache = torch.randn(1, length, kv_heads, dim, generator=generator).half()
    v_cache = torch.randn(1, length, kv_heads, dim, generator=generator).half()
    q = torch.randn(length, heads, dim, generator=generator).half()
    lengths = torch.arange(1, length + 1)  # query i at position i
    rows = torch.zeros(length, dtype=torch.long)
    out = K.decode_attention_reference(q, k_cache, v_cache, lengths, rows, window)
    keys = k_cache[0].float().repeat_interleave(heads // kv_heads, dim=1)  # [length, H, D]
    values = v_cache[0].float().repeat_interleave(heads // kv_heads, dim=1)
    positions, zero = torch.arange(length), torch.tensor(0)
    mask = visible(zero, zero, positions[:, None], positions[None, :])  # [query, key]
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) / dim**0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = torch.einsum("hqk,khd->qhd", weights, values)
    assert (out.float() - expected).abs().max() < 2e-3
    windowed = window is not None and window < length
    assert bool((mask.sum(1) < lengths).any()) == windowed  # a window that cuts, or none


# -- the network -----------------------------------------------------------------------------


def test_logits_match_transformers_past_the_window(window_model: str) -> None:
    """Teacher-forced: a 102-token prompt (more than six windows) in one prefill, in passes of
    7 tokens (each attending to cached keys), and 12 decode steps; every step's logits."""
    reference = engine_of(window_model, "transformers")
    model = FastMistral(Path(window_model), torch.device(DEVICE), max_batch=2, max_len=128)
    model.allocate_kv_rows()
    ids = reference.encode(render_messages([SystemMessage(DOCUMENTS), HumanMessage(QUESTIONS[4])]))
    assert len(ids) > 6 * WINDOW
    cache_arg = reference._cache_arg
    errors, agree = [], []
    with torch.inference_mode():
        out = reference.model(input_ids=torch.tensor([ids], device=DEVICE), use_cache=True)
        expected, cache = out["logits"][0, -1], out[cache_arg]
        whole = model.prefill(0, ids)
        for start in range(0, len(ids), 7):  # row 1, in pieces
            pieces = model.prefill(1, ids[start : start + 7], start)
        for got in (whole, pieces):
            errors.append(rel(got, expected))
            agree.append(int(got.argmax()) == int(expected.argmax()))
        position = len(ids)
        for _ in range(12):  # feed the reference's own tokens to both rows
            token = int(expected.argmax())
            out = reference.model(input_ids=torch.tensor([[token]], device=DEVICE),
                                  use_cache=True, **{cache_arg: cache})  # fmt: skip
            expected, cache = out["logits"][0, -1], out[cache_arg]
            tokens = torch.tensor([token, token], device=DEVICE)
            got = model.decode(2, tokens, torch.tensor([position, position], device=DEVICE))
            errors += [rel(got[0], expected), rel(got[1], expected)]
            agree += [int(row.argmax()) == int(expected.argmax()) for row in got]
            position += 1
    assert max(errors) < LOGITS_REL, errors
    assert all(agree), agree
    assert model.sliding_window == WINDOW


def test_a_prefill_past_the_window_attends_in_chunks_of_bounded_size(
    window_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No attention call sees more than a chunk of queries and a chunk plus a window of keys
    (never the whole prompt's square), and the chunk size changes nothing."""
    from langchain_synthia import _fast_model

    model = FastMistral(Path(window_model), torch.device(DEVICE), max_batch=1, max_len=128)
    model.allocate_kv_rows()
    ids = engine_of(window_model, "transformers").encode(
        render_messages([SystemMessage(DOCUMENTS), HumanMessage(QUESTIONS[4])])
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    shapes: list[tuple[int, int]] = []

    def spy(query: torch.Tensor, key: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shapes.append((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    results = {}
    for chunk in (_fast_model.WINDOW_CHUNK, 5):
        monkeypatch.setattr(_fast_model, "WINDOW_CHUNK", chunk)
        shapes.clear()
        with torch.inference_mode():
            results[chunk] = model.prefill(0, ids)
        size = min(chunk, WINDOW)
        assert len(shapes) == len(model.layers) * -(-len(ids) // size)
        assert all(q <= size and k <= size + WINDOW - 1 for q, k in shapes), shapes
    assert rel(results[5], results[_fast_model.WINDOW_CHUNK]) < 1e-3


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).norm() / ref.norm())


# -- ChatSynthia on the fast engine ----------------------------------------------------------


def test_greedy_answers_equal_transformers_one_call_at_a_time(
    window_model: str, transformers_answers: dict[str, str]
) -> None:
    """Prompts of 49 to 104 tokens (3 to 6 windows), 32 new tokens each."""
    chat = chat_of(window_model, "fast")
    for name, expected in transformers_answers.items():
        messages = [HumanMessage(name.removeprefix("docs: "))]
        if name.startswith("docs: "):
            messages.insert(0, SystemMessage(DOCUMENTS))
        assert chat.invoke(messages).content == expected, name


def test_greedy_answers_equal_transformers_in_a_batch_of_rows_at_different_lengths(
    window_model: str, transformers_answers: dict[str, str]
) -> None:
    chat = chat_of(window_model, "fast", max_batch_size=len(QUESTIONS))
    answers = chat.batch(QUESTIONS)
    assert [a.content for a in answers] == [transformers_answers[q] for q in QUESTIONS]


def test_a_prompts_rest_after_a_reused_prefix_attends_within_the_window(
    window_model: str, transformers_answers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With prefix caching, a second call's rest (tokens past the shared system message) runs
    as one decode-shaped step, each of its tokens its own window; the answers stay the same."""
    chat = chat_of(window_model, "fast")
    engine = chat._engine_for(chat.model, chat.revision)
    first = [SystemMessage(DOCUMENTS), HumanMessage(WITH_DOCUMENTS[1])]
    assert chat.invoke(first).content == transformers_answers[f"docs: {WITH_DOCUMENTS[1]}"]
    question = "Which of these documents talks about a bicycle, and what does it say about it?"
    second = [SystemMessage(DOCUMENTS), HumanMessage(question)]
    rests: list = []
    run = engine._prefill_suffix
    monkeypatch.setattr(engine, "_prefill_suffix", lambda *a: rests.append(a[1]) or run(*a))
    before = engine.prefix_hit_tokens
    answer = chat.invoke(second)
    assert engine.prefix_hit_tokens - before >= 3 * WINDOW  # the system message, shared
    assert len(rests) == 1  # the rest: one decode-shaped step
    assert len(rests[0]) > WINDOW  # longer than the window: each token its own
    assert answer.content == chat_of(window_model, "transformers").invoke(second).content


def test_a_prompt_prefilled_in_passes_answers_as_transformers(
    window_model: str, transformers_answers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passes of 5 tokens: each attends to the cached keys of the pieces before, windowed."""
    chat = chat_of(window_model, "fast", prefix_caching=False)
    engine = chat._engine_for(chat.model, chat.revision)
    monkeypatch.setattr(engine.scheduler, "max_prefill_tokens", 5)  # chunks of 5 tokens
    question = QUESTIONS[-1]
    assert chat.invoke(question).content == transformers_answers[question]
