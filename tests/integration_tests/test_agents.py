"""ChatSynthia inside agents: LangChain's create_agent and a hand-built LangGraph ReAct loop.

On the tiny checkpoint (random weights) the tool call is still valid (the grammar), so the
whole round trip runs: call, tool execution, result back in the prompt, final answer.
"""

from typing import Literal

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from langchain_synthia import ChatSynthia, render_messages
from tests.helpers import DEVICE

pytest.importorskip("langchain.agents")


@tool
def get_weather(city: Literal["Paris", "Tokyo", "Lima"]) -> str:
    """Today's weather in a city."""
    return f"WEATHER-REPORT for {city}"


class Prompts(BaseCallbackHandler):
    """Keeps the prompt of every chat-model call."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.prompts.append(render_messages(messages[0]))


def _chat(tiny_model: str) -> ChatSynthia:
    return ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=64, temperature=0, timeout=60)


def _check_round_trip(messages: list, prompts: Prompts) -> None:
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(calls) == 1
    call = calls[0].tool_calls[0]
    assert call["name"] == "get_weather"
    assert call["args"]["city"] in ("Paris", "Tokyo", "Lima")
    assert results[0].content == f"WEATHER-REPORT for {call['args']['city']}"
    assert results[0].tool_call_id == call["id"]
    final = messages[-1]
    assert isinstance(final, AIMessage)
    assert not final.tool_calls
    # the model saw the tool's result when it wrote the final answer
    assert f"WEATHER-REPORT for {call['args']['city']}" in prompts.prompts[-1]


def test_create_agent_calls_a_tool_and_uses_its_result(tiny_model: str) -> None:
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def one_tool_round(request, handler):
        used = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if used else "any"))

    agent = create_agent(_chat(tiny_model), tools=[get_weather], middleware=[one_tool_round])
    prompts = Prompts()
    result = agent.invoke({"messages": [("user", "Weather in Paris?")]}, {"callbacks": [prompts]})
    _check_round_trip(result["messages"], prompts)


async def test_langgraph_react_loop_async(tiny_model: str) -> None:
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    chat = _chat(tiny_model)

    async def model(state: MessagesState) -> dict:
        used = any(isinstance(m, ToolMessage) for m in state["messages"])
        bound = chat.bind_tools([get_weather], tool_choice="none" if used else "any")
        return {"messages": [await bound.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([get_weather]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    app = graph.compile()
    prompts = Prompts()
    result = await app.ainvoke(
        {"messages": [("user", "Weather in Tokyo?")]}, {"callbacks": [prompts]}
    )
    _check_round_trip(result["messages"], prompts)
