"""Stops never cut a grammar-constrained answer; a cut-off call is an invalid call, never a call.

The schemas here hold constants, so the grammar decides every character of a structured answer
or a call, whatever the random weights sample: stops drawn from inside that text must leave it
whole (`stop=`, the instance's `stop`, and the ``USER:`` turn stop), and free text under
``tool_choice="auto"`` must still be cut exactly. Property tests draw the stops from the answer.
"""

import asyncio
import json
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessageChunk
from langchain_core.utils.json import parse_partial_json
from pydantic import BaseModel
from typing_extensions import TypedDict

from langchain_synthia import ChatSynthia
from langchain_synthia.tools import TOOL_CALL_CLOSE, render_tool_call
from tests.helpers import DEVICE, TokenCounter


class Release(BaseModel):
    """A release."""

    tag: Literal["v1.2.3"]
    note: Literal["USER: ok."]


class ReleaseDict(TypedDict):
    """A release."""

    tag: Literal["v1.2.3"]
    note: Literal["USER: ok."]


RELEASE = {"tag": "v1.2.3", "note": "USER: ok."}
RELEASE_JSON = json.dumps(RELEASE, separators=(",", ":"))
NOTE_TEXT = "Meet at 10.30\nUSER: bring </tool_call> notes."


class Note(BaseModel):
    """Take a note."""

    text: Literal["Meet at 10.30\nUSER: bring </tool_call> notes."]


NOTE_CALL = render_tool_call("Note", {"text": NOTE_TEXT})
SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def chat(tiny_model: str) -> ChatSynthia:
    return ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=64, timeout=60)


@pytest.fixture
def opens_a_call(monkeypatch: pytest.MonkeyPatch, chat: ChatSynthia) -> None:
    """Under "auto", the first token opens a call (random weights never choose one alone).

    Only the first token is steered, to ``<`` or `` <``; the grammar decides the rest.
    """
    from langchain_synthia import _transformers_engine

    tokenizer = chat._engine_for(chat.model, chat.revision).tokenizer
    openers = tokenizer.convert_tokens_to_ids(["<", "\u2581<"])
    original = _transformers_engine.grammar_mask

    def first_token_opens(rows: list, vocab_size: int, device: Any) -> Any:
        allowed = original(rows, vocab_size, device)
        for index, row in enumerate(rows):
            if allowed is not None and row is not None and row.generated == 0:
                keep = allowed[index, openers].clone()
                allowed[index] = False
                allowed[index, openers] = keep
        return allowed

    monkeypatch.setattr(_transformers_engine, "grammar_mask", first_token_opens)


def substrings(text: str) -> st.SearchStrategy[str]:
    """Non-empty pieces of `text` (stops that occur inside it)."""
    return st.tuples(st.integers(0, len(text) - 1), st.integers(1, 8)).map(
        lambda at: text[at[0] : at[0] + at[1]]
    )


def invoke_by(chat: Any, path: str, prompt: str, **kwargs: Any) -> Any:
    """One answer through `path`: invoke, stream (merged), batch, ainvoke or token callbacks."""
    if path == "invoke":
        return chat.invoke(prompt, **kwargs)
    if path == "callbacks":
        return chat.invoke(prompt, config={"callbacks": [TokenCounter()]}, **kwargs)
    if path == "batch":
        return chat.batch([prompt], **kwargs)[0]
    if path == "ainvoke":
        return asyncio.run(chat.ainvoke(prompt, **kwargs))
    parts = list(chat.stream(prompt, **kwargs))
    if isinstance(parts[-1], AIMessageChunk):
        whole = parts[0]
        for part in parts[1:]:
            whole += part
        return whole
    return parts[-1]  # structured output streams growing objects: the last is the answer


PATHS = st.sampled_from(["invoke", "stream", "batch", "ainvoke", "callbacks"])


# -- class 1: stops do not cut a constrained answer ----------------------------------------------


@SETTINGS
@given(
    method=st.sampled_from(["json_schema", "function_calling"]),
    schema=st.sampled_from([Release, ReleaseDict, Release.model_json_schema()]),
    stop=substrings(f'<tool_call>{{"name":"Release","arguments":{RELEASE_JSON}}}</tool_call>'),
    on_instance=st.booleans(),
    path=PATHS,
)
def test_structured_output_is_whole_under_stops_found_inside_it(
    chat: ChatSynthia, method: str, schema: Any, stop: str, on_instance: bool, path: str
) -> None:
    model = chat.model_copy(update={"stop": [stop]}) if on_instance else chat
    structured = model.with_structured_output(schema, method=method)
    answer = invoke_by(structured, path, "Release?", **({} if on_instance else {"stop": [stop]}))
    assert (answer.model_dump() if isinstance(answer, Release) else answer) == RELEASE


@pytest.mark.parametrize("seed", range(4))
def test_json_mode_is_never_a_truncated_object(chat: ChatSynthia, seed: int) -> None:
    stopping = chat.model_copy(update={"stop": [":", ",", '"']})
    structured = stopping.with_structured_output(method="json_mode", include_raw=True)
    result = structured.invoke("JSON please", seed=seed)
    if result["parsing_error"] is None:
        assert result["raw"].response_metadata["finish_reason"] == "stop"
        assert result["parsed"] == json.loads(result["raw"].content)
    else:  # random keys are unbounded strings: cut off at max_tokens, and said so
        assert result["raw"].response_metadata["finish_reason"] == "length"


@SETTINGS
@given(
    choice=st.sampled_from(["Release", "any"]),
    stop=substrings(f'<tool_call>{{"name":"Release","arguments":{RELEASE_JSON}}}</tool_call>'),
    path=PATHS,
)
def test_a_forced_call_is_whole_under_stops_found_inside_it(
    chat: ChatSynthia, choice: str, stop: str, path: str
) -> None:
    bound = chat.bind_tools([Release], tool_choice=choice)
    message = invoke_by(bound, path, "Release?", stop=[stop])
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("Release", RELEASE)]
    assert message.invalid_tool_calls == []
    assert message.content == ""
    assert message.response_metadata["finish_reason"] == "stop"


@SETTINGS
@given(stop=substrings(NOTE_CALL), path=PATHS)
def test_an_auto_call_is_whole_under_the_user_turn_stop_and_stops_inside_it(
    chat: ChatSynthia, opens_a_call: None, stop: str, path: str
) -> None:
    bound = chat.bind_tools([Note])  # tool_choice="auto"; the USER: turn stop is on
    message = invoke_by(bound, path, "Note it.", stop=[stop])
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("Note", {"text": NOTE_TEXT})]
    assert message.invalid_tool_calls == []
    assert message.content == ""


@pytest.mark.parametrize("seed", range(3))
def test_auto_free_text_is_still_cut_by_stops(chat: ChatSynthia, seed: int) -> None:
    bound = chat.bind_tools([Note], temperature=1.0, seed=seed)
    whole = bound.invoke("Hello", stop_at_user_turn=False).content
    assert whole
    assert not whole.lstrip().startswith("<")  # random weights answer in text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    for path in ("invoke", "stream", "callbacks"):
        cut = invoke_by(bound, path, "Hello", stop=[stop], stop_at_user_turn=False)
        assert cut.content == whole[: whole.find(stop)]
        assert cut.response_metadata["finish_reason"] == "stop"
        assert cut.tool_calls == cut.invalid_tool_calls == []


# -- class 9: the closing marker inside an argument ---------------------------------------------


@pytest.mark.parametrize("path", ["invoke", "stream", "batch", "ainvoke", "callbacks"])
def test_a_closing_marker_inside_an_argument_is_read_as_text(chat: ChatSynthia, path: str) -> None:
    for bound in (
        chat.bind_tools([Note], tool_choice="Note"),
        chat.bind_tools([Note], tool_choice="any", parallel_tool_calls=True),
    ):
        message = invoke_by(bound, path, "Note it.", max_tokens=200)
        assert message.tool_calls
        assert all(c["args"] == {"text": NOTE_TEXT} for c in message.tool_calls)
        cut = message.response_metadata["finish_reason"] == "length"  # parallel calls may run on
        assert len(message.invalid_tool_calls) <= (1 if cut else 0)
        assert TOOL_CALL_CLOSE in message.tool_calls[0]["args"]["text"]


@pytest.mark.parametrize("path", ["invoke", "stream", "ainvoke"])
def test_structured_output_with_the_closing_marker_inside_a_value(
    chat: ChatSynthia, path: str
) -> None:
    for method in ("function_calling", "json_schema"):
        structured = chat.with_structured_output(Note, method=method)
        assert invoke_by(structured, path, "Note it.") == Note(text=NOTE_TEXT)


def test_an_auto_call_with_the_closing_marker_inside_an_argument(
    chat: ChatSynthia, opens_a_call: None
) -> None:
    message = chat.bind_tools([Note]).invoke("Note it.")
    assert [c["args"] for c in message.tool_calls] == [{"text": NOTE_TEXT}]


# -- issue #22: a call cut off by max_tokens ----------------------------------------------------


def check_cut_call(message: Any, *, with_error: bool = True) -> None:
    assert message.response_metadata["finish_reason"] == "length"
    assert message.tool_calls == []
    assert message.content == ""
    assert len(message.invalid_tool_calls) == 1
    call = message.invalid_tool_calls[0]
    assert call["name"] in (None, "Note")
    if with_error:
        assert "cut off at max_tokens" in call["error"]
        partial = parse_partial_json(call["args"]) if call["args"] else {}
        assert partial is None or NOTE_TEXT.startswith(partial.get("text", ""))


def test_a_forced_call_cut_at_any_max_tokens_is_an_invalid_call(chat: ChatSynthia) -> None:
    # greedy: the grammar fixes the call's characters, not how they are cut into tokens, so a
    # sampled call can be shorter than the one measured and end before a later max_tokens
    bound = chat.bind_tools([Note], tool_choice="Note", temperature=0)
    whole = bound.invoke("Note it.", max_tokens=200)
    length = whole.usage_metadata["output_tokens"]
    assert whole.tool_calls
    assert length > 10
    for max_tokens in [*range(1, length, 7), length - 1]:
        check_cut_call(bound.invoke("Note it.", max_tokens=max_tokens))
    for path in ("stream", "callbacks", "ainvoke"):
        message = invoke_by(bound, path, "Note it.", max_tokens=length // 2)
        check_cut_call(message, with_error=path != "stream")  # merged chunks carry no error


def test_a_started_auto_call_cut_by_max_tokens_is_an_invalid_call(
    chat: ChatSynthia, opens_a_call: None
) -> None:
    bound = chat.bind_tools([Note])
    for max_tokens in (1, 3, 12, 20):
        check_cut_call(bound.invoke("Note it.", max_tokens=max_tokens))


def test_structured_output_cut_by_max_tokens_raises(chat: ChatSynthia) -> None:
    for method in ("function_calling", "json_schema"):
        for schema in (Note, Note.model_json_schema()):
            structured = chat.with_structured_output(schema, method=method)
            with pytest.raises(OutputParserException, match="max_tokens"):
                structured.invoke("Note it.", max_tokens=8)
            with pytest.raises(OutputParserException, match="max_tokens"):
                list(structured.stream("Note it.", max_tokens=8))
