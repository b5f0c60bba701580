"""Reading tool calls back from an answer's text: whole calls only, however the text is split."""

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_synthia.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCallReader,
    render_tool_call,
)


def read(pieces: list[str], finish: str = "stop", *, forced: bool = False) -> tuple:
    reader = ToolCallReader(forced=forced)
    content, chunks = "", []
    for piece in pieces:
        text, calls = reader.feed(piece)
        content += text
        chunks += calls
    rest, unfinished = reader.finish(finish)
    return content + rest, chunks, unfinished, reader.unfinished


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


MARKERS = st.sampled_from([TOOL_CALL_CLOSE, TOOL_CALL_OPEN, '"}', "}}", "\\", '"', "USER:", "."])
STRINGS = st.lists(st.one_of(MARKERS, st.text(max_size=4)), max_size=6).map("".join)
ARGUMENTS = st.dictionaries(
    st.one_of(MARKERS, st.text(min_size=1, max_size=4)),
    st.one_of(STRINGS, st.integers(), st.lists(STRINGS, max_size=2)),
    max_size=3,
)


def test_a_closing_marker_inside_a_string_does_not_end_the_call() -> None:
    call = render_tool_call("note", {"text": f"a{TOOL_CALL_CLOSE}b", "n": 1})
    content, chunks, _, unfinished = read([call[:30], call[30:]])
    assert content == ""
    assert [(c["name"], json.loads(c["args"])) for c in chunks] == [
        ("note", {"text": f"a{TOOL_CALL_CLOSE}b", "n": 1})
    ]
    assert unfinished == []


@settings(max_examples=300, deadline=None)
@given(
    calls=st.lists(st.tuples(st.sampled_from(["a", "get_weather"]), ARGUMENTS), min_size=1,
                   max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    lead=st.sampled_from(["", " "]),
)  # fmt: skip
def test_any_arguments_any_chunking_give_the_calls_back(
    calls: list[tuple[str, dict]], cuts: list[int], lead: str
) -> None:
    text = lead + "\n".join(render_tool_call(name, args) for name, args in calls)
    content, chunks, _, unfinished = read(split(text, cuts))
    assert content == ""
    assert [(c["name"], json.loads(c["args"])) for c in chunks] == calls
    assert [c["index"] for c in chunks] == list(range(len(calls)))
    assert unfinished == []


@settings(max_examples=300, deadline=None)
@given(
    arguments=ARGUMENTS,
    data=st.data(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_a_call_cut_anywhere_is_an_invalid_call_never_a_call(
    arguments: dict, data: st.DataObject, cuts: list[int]
) -> None:
    whole = render_tool_call("get_weather", arguments)
    cut = whole[: data.draw(st.integers(1, len(whole) - 1))]
    content, chunks, streamed, unfinished = read(split(cut, cuts), "length")
    assert content == ""
    assert chunks == []
    assert len(unfinished) == 1
    call = unfinished[0]
    assert "cut off at max_tokens" in call["error"]
    assert call["name"] in (None, "get_weather")
    written = json.dumps(arguments, ensure_ascii=False)  # as render_tool_call writes them
    assert written.startswith(call["args"])  # the arguments as far as they were written
    assert [c["id"] for c in streamed] == [call["id"]]
    assert streamed[0]["args"].startswith(TOOL_CALL_OPEN)  # merged chunks: an invalid call


@pytest.mark.parametrize(
    "written",
    [
        '<tool_call>{"name":"get_weather","arguments":{"city":"Pa',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa',
        '<tool_call>{ "name" : "get_weather" , "arguments" : { "city" : "Pa',
        '<tool_call> {"name": "get_weather", "arguments": {"city": "Pa',
    ],
)
def test_a_cut_call_is_read_with_the_spacing_the_grammar_allows(written: str) -> None:
    """One space or none between JSON tokens: the cut call's name and arguments are read."""
    *_, unfinished = read([written], "length")
    assert [(c["name"], c["args"].replace(" ", "")) for c in unfinished] == [
        ("get_weather", '{"city":"Pa')
    ]


@pytest.mark.parametrize("space", ["", " "])
def test_a_call_is_read_with_the_spacing_the_grammar_allows(space: str) -> None:
    """Between ``<tool_call>`` and the JSON the grammar may put one space."""
    text = f'<tool_call>{space}{{"name": "a", "arguments": {{"x": 1}}}}</tool_call>'
    content, chunks, _, unfinished = read(split(text, [12, 13, 20]))
    assert (content, unfinished) == ("", [])
    assert [(c["name"], json.loads(c["args"])) for c in chunks] == [("a", {"x": 1})]


def test_a_forced_call_that_never_started_is_an_invalid_call() -> None:
    _, chunks, _, unfinished = read([" "], "length", forced=True)
    assert chunks == []
    assert [(c["name"], c["args"]) for c in unfinished] == [(None, "")]
    assert "max_tokens" in unfinished[0]["error"]
    assert read([" "], "length")[3] == []  # "auto": no call was started


def test_text_is_content_and_a_later_marker_is_text() -> None:
    content, chunks, _, unfinished = read(["Hi <tool_call>", '{"name":"a"}</tool_call>'])
    assert content == 'Hi <tool_call>{"name":"a"}</tool_call>'
    assert (chunks, unfinished) == ([], [])
