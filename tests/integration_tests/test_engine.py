"""The engine's stop handling, driven by a scripted model that writes exactly what we ask.

A random-weight model never writes ``USER:`` on cue, so these tests swap in a stand-in model that
returns logits choosing a fixed token sequence (with the real Mistral tokenizer). Everything else
is the real engine: padding, sampling, detokenizing, stop matching, events.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from langchain_synthia._params import USER_TURN_STOPS
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._sampling import SamplingParams
from langchain_synthia._transformers_engine import TransformersEngine

GREEDY = SamplingParams(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)


class ScriptedLM(torch.nn.Module):
    """Answers every prompt with the same token script, then EOS."""

    def __init__(self, script: list[int], vocab: int = 32000) -> None:
        super().__init__()
        self.script = script
        self.config = SimpleNamespace(vocab_size=vocab)
        self.device = torch.device("cpu")
        self.calls = 0

    def forward(
        self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, cache=None
    ):
        self.calls += 1
        step = 0 if cache is None else cache + 1
        token = self.script[step] if step < len(self.script) else 2
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        logits[:, -1, token] = 10.0
        return {"logits": logits, "cache": step}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str):
    return AutoTokenizer.from_pretrained(tiny_model)


def run(tokenizer, answer: str, stops=USER_TURN_STOPS, max_new_tokens: int = 100):
    script = tokenizer(answer, add_special_tokens=False).input_ids
    model = ScriptedLM(script)
    engine = TransformersEngine(model, tokenizer, name="scripted")
    request = GenerationRequest("USER: hi\nASSISTANT:", max_new_tokens, GREEDY, tuple(stops))
    (stream,) = engine.submit([request])
    events = list(stream)
    return script, model, events


def test_a_new_user_turn_ends_generation_and_is_not_returned(tokenizer) -> None:
    script, model, events = run(tokenizer, " Sure, here it is.\nUSER: and now\nASSISTANT: more")
    text = "".join(e.text for e in events)
    assert text == "Sure, here it is."
    assert events[-1].finish_reason == "stop"
    upto = tokenizer(" Sure, here it is.\nUSER:", add_special_tokens=False).input_ids
    assert events[-1].output_tokens == len(upto) == len(events)
    assert model.calls == len(upto)  # no step was spent after the stop
    assert [e.token_id for e in events] == script[: len(upto)]


def test_a_word_that_merely_starts_like_the_stop_is_released(tokenizer) -> None:
    _, _, events = run(tokenizer, " Plug in the USB cable. USERS love it.")
    assert "".join(e.text for e in events) == "Plug in the USB cable. USERS love it."
    assert events[-1].finish_reason == "stop"  # EOS after the script


def test_length_finish_flushes_held_text(tokenizer) -> None:
    answer = " Ask the US"
    _script, _, events = run(
        tokenizer, answer, max_new_tokens=len(tokenizer(answer, add_special_tokens=False).input_ids)
    )
    assert "".join(e.text for e in events) == "Ask the US"
    assert events[-1].finish_reason == "length"


def test_end_of_sequence_flushes_held_text(tokenizer) -> None:
    """An answer that ends (EOS) on what could have been the start of a stop keeps that text."""
    _, _, events = run(tokenizer, " Ask the US")  # "US" might have become "USER:"; EOS follows
    assert "".join(e.text for e in events) == "Ask the US"
    assert events[-1].finish_reason == "stop"


def test_unicode_split_across_tokens_arrives_whole(tokenizer) -> None:
    _, _, events = run(tokenizer, " Emoji 😀 and 日本語 done")
    texts = [e.text for e in events]
    assert "".join(texts) == "Emoji 😀 and 日本語 done"
    assert all("\ufffd" not in t for t in texts)


def test_one_event_per_token_and_usage_on_the_last(tokenizer) -> None:
    script, _, events = run(tokenizer, " One two three.", stops=())
    assert len(events) == len(script) + 1  # the script, then EOS
    assert [e.finish_reason for e in events[:-1]] == [None] * len(script)
    last = events[-1]
    assert (last.token_id, last.finish_reason, last.output_tokens) == (2, "stop", len(script) + 1)
    assert last.input_tokens == len(tokenizer("USER: hi\nASSISTANT:").input_ids)


def test_text_react_stops_at_observation(tokenizer) -> None:
    """SynthiaLLM's text ReAct loops: the answer ends before the model invents an observation."""
    answer = (
        " Thought: I need the weather.\nAction: get_weather\nAction Input: Paris\nObservation: sun"
    )
    script, model, events = run(tokenizer, answer, stops=("Observation:",))
    text = "".join(e.text for e in events)
    assert text == "Thought: I need the weather.\nAction: get_weather\nAction Input: Paris\n"
    assert events[-1].finish_reason == "stop"
    assert model.calls < len(script)  # stopped at the stop, not at the end of the script


def test_a_grammar_overrules_the_model(tokenizer) -> None:
    """The model wants to write prose; under a JSON-schema grammar only valid JSON comes out."""
    import json

    from langchain_synthia._grammar import json_schema_grammar

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    script = tokenizer(" I would rather write prose.", add_special_tokens=False).input_ids
    engine = TransformersEngine(ScriptedLM(script), tokenizer, name="scripted")
    request = GenerationRequest(
        "USER: hi\nASSISTANT:", 40, GREEDY, (), grammar=json_schema_grammar(schema)
    )
    (stream,) = engine.submit([request])
    events = list(stream)
    answer = json.loads("".join(e.text for e in events))
    assert set(answer) == {"ok"}
    assert isinstance(answer["ok"], bool)
    assert events[-1].finish_reason == "stop"  # the grammar completed: no EOS needed
