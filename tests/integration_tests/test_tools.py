"""Tool calling and structured output on the tiny checkpoint (random weights, real grammar).

A random-weight model means nothing, so these tests check what the grammar guarantees: every
call names a bound tool, its arguments validate against the tool's schema, every structured
answer parses into the schema, on every seed. Schemas here keep strings bounded (enums,
maxLength): a random model rarely closes an unbounded string (see the standard suite's xfails).
"""

import json
from typing import Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_synthia import ChatSynthia, GrammarError
from tests.helpers import DEVICE

SEEDS = range(8)


class Weather(BaseModel):
    """Look up the weather."""

    city: Literal["Paris", "Tokyo", "Lima"]
    days: int = Field(ge=1, le=14)
    unit: Literal["c", "f"] = "c"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def get_weather(city: Literal["Paris", "Tokyo", "Lima"]) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


@pytest.fixture
def chat(tiny_model: str) -> ChatSynthia:
    return ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=64, timeout=60)


def _valid(call: dict, schema: type[BaseModel]) -> None:
    schema.model_validate(call["args"])  # raises if the arguments do not fit the schema
    assert call["id"].startswith("call_")
    assert call["type"] == "tool_call"


@pytest.mark.parametrize("choice", ["any", "required", "Weather"])
def test_forced_calls_always_validate(chat: ChatSynthia, choice: str) -> None:
    bound = chat.bind_tools([Weather, add], tool_choice=choice)
    for seed in SEEDS:
        message = bound.invoke("Weather in Paris for 3 days?", seed=seed, temperature=1.0)
        assert message.response_metadata["finish_reason"] == "stop"
        assert len(message.tool_calls) == 1, message
        call = message.tool_calls[0]
        if choice == "Weather":
            assert call["name"] == "Weather"
        _valid(call, Weather if call["name"] == "Weather" else add.args_schema)
        assert message.content == ""
        assert message.usage_metadata["output_tokens"] > 0


def test_streamed_call_arrives_as_tool_call_chunks_equal_to_invoke(chat: ChatSynthia) -> None:
    bound = chat.bind_tools([Weather], tool_choice="any", temperature=0)
    chunks = list(bound.stream("Weather?"))
    with_calls = [c for c in chunks if c.tool_call_chunks]
    assert len(with_calls) == 1  # the whole call, once it closed
    assert chunks[-1].chunk_position == "last"
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    invoked = bound.invoke("Weather?")
    assert [c["args"] for c in full.tool_calls] == [c["args"] for c in invoked.tool_calls]
    assert full.tool_calls[0]["name"] == "Weather"
    assert any(block["type"] == "tool_call" for block in full.content_blocks)


async def test_async_calls_validate(chat: ChatSynthia) -> None:
    bound = chat.bind_tools([Weather], tool_choice="any")
    message = await bound.ainvoke("Weather?", seed=3)
    _valid(message.tool_calls[0], Weather)


def test_parallel_calls_when_allowed(chat: ChatSynthia) -> None:
    bound = chat.bind_tools([Weather], tool_choice="any", parallel_tool_calls=True, temperature=0)
    message = bound.invoke("Weather in Paris, then in Lima.", max_tokens=200)
    assert len(message.tool_calls) >= 1
    for call in message.tool_calls:
        _valid(call, Weather)
    assert len({call["id"] for call in message.tool_calls}) == len(message.tool_calls)


def test_tool_choice_none_answers_in_text_without_tools(chat: ChatSynthia) -> None:
    bound = chat.bind_tools([Weather], tool_choice="none", temperature=0)
    message = bound.invoke("Hello")
    assert message.tool_calls == []
    assert message.content == chat.invoke("Hello", temperature=0).content  # the plain prompt


def test_auto_may_answer_in_text_or_call(chat: ChatSynthia) -> None:
    bound = chat.bind_tools([Weather])
    for seed in SEEDS:
        message = bound.invoke("Hello", seed=seed)
        for call in message.tool_calls:
            _valid(call, Weather)
        if not message.tool_calls:
            assert not message.content.lstrip().startswith("<")


def test_a_cut_off_call_is_an_invalid_call_never_a_call(chat: ChatSynthia) -> None:
    message = chat.bind_tools([Weather], tool_choice="any").invoke("Weather?", max_tokens=6)
    assert message.response_metadata["finish_reason"] == "length"
    assert message.tool_calls == []
    assert message.content == ""
    [call] = message.invalid_tool_calls
    assert "cut off at max_tokens" in call["error"]
    assert call["id"].startswith("call_")


def test_tool_results_continue_the_conversation(chat: ChatSynthia) -> None:
    bound = chat.bind_tools([add], tool_choice="any", temperature=1.0, seed=0)
    first = bound.invoke("What is 1 + 2?")
    call = first.tool_calls[0]
    result = add.invoke(call)
    assert isinstance(result, ToolMessage)
    history = [HumanMessage("What is 1 + 2?"), first, result]
    answer = chat.bind_tools([add], temperature=0).invoke(history)
    assert isinstance(answer, AIMessage)
    prompt = chat._prepare(history, None, {})[1]
    assert f'<tool_result name="add" id="{call["id"]}">\n{result.content}\n</tool_result>' in (
        prompt
    )


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_tool_choice_names_the_tools(chat: ChatSynthia) -> None:
    with pytest.raises(ValueError, match="names no bound tool; the tools are: Weather, add"):
        chat.bind_tools([Weather, add], tool_choice="subtract")
    with pytest.raises(ValueError, match="is not a tool choice"):
        chat.bind_tools([Weather], tool_choice=3)


def test_schema_the_grammar_cannot_express_is_refused_at_bind_time(chat: ChatSynthia) -> None:
    lookbehind = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "x",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "pattern": "(?<=a)b"}},
            },
        },
    }
    with pytest.raises(GrammarError, match=r"(?s)lookup.*look-around"):
        chat.bind_tools([lookbehind])


def test_not_a_json_schema_is_refused(chat: ChatSynthia) -> None:
    with pytest.raises(ValueError, match="Invalid type"):
        chat.with_structured_output({"type": "object", "properties": {"a": {"type": "foo"}}})
    with pytest.raises(ValueError, match="parameters must be a JSON schema of an object"):
        chat.bind_tools([{"name": "f", "description": "d", "parameters": {"type": "string"}}])
    with pytest.raises(ValueError, match="not supported: use one of"):
        chat.with_structured_output(Weather, method="xml")


def test_two_different_tools_with_one_name_are_refused(chat: ChatSynthia) -> None:
    other = {"name": "add", "description": "d", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(ValueError, match="Two different tools are named 'add'"):
        chat.bind_tools([add, other])


# -- structured output --------------------------------------------------------------------------


class Verdict(TypedDict):
    label: Literal["yes", "no", "maybe"]
    score: int


VERDICT_SCHEMA = {
    "title": "Verdict",
    "type": "object",
    "properties": {
        "label": {"enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["label", "score"],
}


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_validates_on_every_try(chat: ChatSynthia, method: str) -> None:
    for schema in (Weather, Verdict, VERDICT_SCHEMA):
        structured = chat.with_structured_output(schema, method=method)
        for seed in SEEDS:
            answer = structured.invoke("Decide.", seed=seed, temperature=1.0)
            if schema is Weather:
                assert isinstance(answer, Weather)
            else:
                assert set(answer) <= {"label", "score", "note"}
                assert answer["label"] in ("yes", "no", "maybe")
                assert isinstance(answer["score"], int)


def test_json_schema_streams_growing_partial_objects(chat: ChatSynthia) -> None:
    structured = chat.with_structured_output(VERDICT_SCHEMA)
    parts = list(structured.stream("Decide.", temperature=0))
    assert parts
    assert all(isinstance(p, dict) for p in parts)
    assert parts[-1] == structured.invoke("Decide.", temperature=0)


def test_json_mode_answers_a_json_object_or_says_it_was_cut(chat: ChatSynthia) -> None:
    structured = chat.with_structured_output(method="json_mode", include_raw=True)
    for seed in SEEDS:
        result = structured.invoke("JSON please", seed=seed)
        assert result["raw"].content.lstrip().startswith("{")
        if result["parsing_error"] is None:
            assert isinstance(result["parsed"], dict)
        else:  # random keys are unbounded strings: cut off, and said so
            assert result["raw"].response_metadata["finish_reason"] == "length"
            assert "cut off at max_tokens" in str(result["parsing_error"])


def test_include_raw_reports_a_cut_off_answer_instead_of_a_truncated_object(
    chat: ChatSynthia,
) -> None:
    short = chat.model_copy(update={"max_tokens": 4})
    result = short.with_structured_output(Weather, include_raw=True).invoke("Weather?")
    assert result["parsed"] is None
    assert result["raw"].response_metadata["finish_reason"] == "length"
    assert "cut off at max_tokens" in str(result["parsing_error"])
    with pytest.raises(OutputParserException, match="raise max_tokens"):
        short.with_structured_output(Weather).invoke("Weather?")
    whole = chat.with_structured_output(Weather, include_raw=True).invoke("Weather?", seed=1)
    assert isinstance(whole["parsed"], Weather)
    assert whole["parsing_error"] is None


def test_structured_output_is_cut_by_no_stop(chat: ChatSynthia) -> None:
    for stop in (None, ["."]):
        request_options, _, plan = chat.model_copy(update={"stop": ["}"]})._prepare(
            [HumanMessage("x")], stop, {"response_format": {"type": "json_object"}}
        )
        assert plan.structured
        assert request_options["stop_at_user_turn"] is False
        assert json.loads(json.dumps(request_options["stop"])) == []


def test_a_constrained_answer_has_no_repetition_penalty_unless_one_is_set(
    chat: ChatSynthia,
) -> None:
    """The default penalty counts the prompt's tokens as repeats; a constrained answer copies
    its values from the prompt, so it is decoded without one. A penalty set by the caller
    (on the model or for the call) is kept; free text keeps the default."""

    def penalty(model: ChatSynthia, kwargs: dict) -> float:
        return model._prepare([HumanMessage("x")], None, kwargs)[0]["repetition_penalty"]

    formats = {"response_format": {"type": "json_object"}}
    forced = {"tools": chat.bind_tools([Weather]).kwargs["tools"], "tool_choice": "Weather"}
    for kwargs in (formats, forced):
        assert penalty(chat, kwargs) == 1.0
        assert penalty(chat, {**kwargs, "repetition_penalty": 1.3}) == 1.3
        assert penalty(chat.model_copy(update={"repetition_penalty": 1.2}), kwargs) == 1.2
    assert penalty(chat, {}) == 1.1


class Reversed(BaseModel):
    """Keys out of alphabetical order."""

    zone: Literal["north", "south"]
    age: int = Field(ge=0, le=99)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_a_structured_answer_writes_the_keys_in_the_schema_s_order(
    chat: ChatSynthia, method: str
) -> None:
    """The order a schema gives is the order the model writes (a field the model should fill
    first comes first): ``zone`` before ``age``, never sorted."""
    structured = chat.with_structured_output(Reversed, method=method, include_raw=True)
    for seed in SEEDS[:3]:
        raw = structured.invoke("Where and how old?", seed=seed, temperature=1.0)["raw"]
        written = raw.content if method == "json_schema" else raw.tool_calls[0]["args"]
        keys = list(json.loads(written) if isinstance(written, str) else written)
        assert keys == ["zone", "age"]
