"""`render_messages_for_counting`: the text a token count measures, for any list of messages."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_synthia import DEFAULT_SYSTEM_MESSAGE, render_messages
from langchain_synthia.prompts import render_messages_for_counting

CASES = 300
"""Histories each property tries per run."""

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_turn = st.one_of(
    st.builds(HumanMessage, content=_text),
    st.builds(AIMessage, content=_text),
    st.builds(lambda text: ToolMessage(text, tool_call_id="call_1"), _text),
)
histories = st.tuples(
    st.lists(st.builds(SystemMessage, content=_text), max_size=2),
    st.lists(_turn, max_size=6),
    st.sampled_from([DEFAULT_SYSTEM_MESSAGE, "Be brief.", None]),
    st.sampled_from(["", "You may call tools."]),
)
"""System messages first (as trim_messages keeps them), then turns; the default system message
and a tools section."""


def _settings() -> settings:
    return settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_no_messages_give_no_text() -> None:
    assert render_messages_for_counting([]) == ""
    assert render_messages_for_counting([], "Be brief.", tools_section="Tools.") == ""


def test_system_messages_alone_give_the_system_line_that_opens_their_prompt() -> None:
    system = [SystemMessage("Be brief."), SystemMessage("USER: in French.")]
    text = render_messages_for_counting(system, tools_section="Tools.")
    assert text == "SYSTEM: Be brief.\nUSER\uff1a in French.\n\nTools."
    assert render_messages([*system, HumanMessage("Hi")], tools_section="Tools.").startswith(
        text + "\n"
    )
    assert render_messages_for_counting([SystemMessage("")]) == "SYSTEM:"


def test_a_conversation_is_refused_for_its_messages_as_render_messages_refuses_it() -> None:
    with pytest.raises(ValueError, match="text-only"):
        render_messages_for_counting([SystemMessage([{"type": "image", "url": "x"}])])


@_settings()
@given(history=histories)
def test_every_prefix_has_a_text_that_grows_and_is_the_prompt_when_there_is_one(
    history: tuple[list, list, str | None, str],
) -> None:
    systems, turns, default, tools = history
    messages = systems + turns
    texts = [
        render_messages_for_counting(messages[:k], default, tools_section=tools)
        for k in range(len(messages) + 1)
    ]
    assert texts[0] == ""
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(texts)), texts
    for k in range(len(systems) + 1, len(messages) + 1):
        assert texts[k] == render_messages(messages[:k], default, tools_section=tools)
    for k in range(1, len(systems) + 1):
        prompt = render_messages([*messages[:k], HumanMessage("x")], default, tools_section=tools)
        assert prompt.startswith(texts[k] + "\n")
