"""The profile LangChain's agents read, and what they then ask of the model.

With ``structured_output`` in the profile, ``create_agent(model, tools=[...],
response_format=Schema)`` binds the tools together with a ``response_format`` (its provider
strategy): each answer is then tool calls or, once the model answers, the schema's JSON.
"""

import json
from typing import Literal

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_synthia import ChatSynthia
from tests.helpers import DEVICE

SEEDS = 6
"""Sampled answers the tools-or-JSON test reads per run."""


class Verdict(BaseModel):
    label: Literal["yes", "no"]
    score: int = Field(ge=0, le=9)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "Verdict", "schema": Verdict.model_json_schema()},
}


def test_a_profile_made_from_the_settings_follows_them_in_copies() -> None:
    chat = ChatSynthia(context_window=2048)
    assert chat.profile["max_input_tokens"] == 2047
    smaller = chat.model_copy(update={"context_window": 1024})
    assert smaller.profile["max_input_tokens"] == smaller.profile["max_output_tokens"] == 1023
    remote = chat.model_copy(update={"base_url": "http://127.0.0.1:9/v1", "server": "openai"})
    assert "max_input_tokens" not in remote.profile
    assert remote.profile["tool_calling"] is False
    given = ChatSynthia(profile={"max_input_tokens": 100})
    assert given.model_copy(update={"context_window": 1024}).profile == {"max_input_tokens": 100}


def test_a_remote_profile_of_an_undetected_server_leaves_tools_unsaid() -> None:
    profile = ChatSynthia(base_url="http://127.0.0.1:9/v1").profile
    assert profile["text_inputs"] is True
    assert "tool_calling" not in profile
    assert "structured_output" not in profile


def test_tools_with_a_response_format_give_whole_calls_or_the_json(tiny_model: str) -> None:
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=64, temperature=1.0)
    bound = chat.bind_tools([add], response_format=RESPONSE_FORMAT)
    kinds = []
    for seed in range(SEEDS):
        message = bound.invoke("Decide.", seed=seed)
        assert message.response_metadata["finish_reason"] == "stop", message
        assert not message.invalid_tool_calls
        if message.tool_calls:
            assert message.content == ""
            assert [call["name"] for call in message.tool_calls] == ["add"]
            kinds.append("call")
        else:
            Verdict.model_validate(json.loads(message.content))
            kinds.append("json")
    assert set(kinds) == {"call", "json"}, kinds  # both ways out are open


def test_a_forced_call_with_a_response_format_is_refused_and_none_gives_the_json(
    tiny_model: str,
) -> None:
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=32, temperature=0)
    with pytest.raises(ValueError, match="tool_choice='auto'"):
        chat.bind_tools([add], tool_choice="any", response_format=RESPONSE_FORMAT).invoke("Hi")
    message = chat.bind_tools([add], tool_choice="none", response_format=RESPONSE_FORMAT).invoke(
        "Decide."
    )
    Verdict.model_validate_json(message.content)


def test_create_agent_with_tools_and_a_response_format(tiny_model: str) -> None:
    """Each run ends with the structured response, or calls `add` until the recursion limit
    (the tiny checkpoint's random weights may keep calling); never a parse error."""
    agents = pytest.importorskip("langchain.agents")
    from langgraph.errors import GraphRecursionError

    answered = 0
    for seed in range(3):
        chat = ChatSynthia(
            model=tiny_model, device=DEVICE, max_tokens=64, temperature=1.0, seed=seed
        )
        agent = agents.create_agent(chat, tools=[add], response_format=Verdict)
        try:
            result = agent.invoke({"messages": [("user", "Decide.")]}, {"recursion_limit": 12})
        except GraphRecursionError:
            continue
        assert isinstance(result["structured_response"], Verdict)
        answered += 1
    assert answered
