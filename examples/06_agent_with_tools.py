"""An agent with tools: LangChain's ``create_agent`` drives ChatSynthia through a tool round trip.

ChatSynthia's tool calls are generated under a grammar built from the tools' schemas, so every
call names a real tool with valid arguments; the agent runs the tool and hands the result back
for the final answer. The middleware below makes the first turn a tool call and the turn after
a tool result a plain answer: one predictable round, which a demo model needs (a trained model
can be left on ``tool_choice="auto"`` to decide for itself).

On a CUDA GPU:

    python examples/06_agent_with_tools.py

Demo form (tiny offline random-weight checkpoint, CPU: the call is valid, the words are not):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/06_agent_with_tools.py
"""

import os
from collections.abc import Callable
from typing import Literal

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import ToolMessage
from langchain_core.tools import tool

from langchain_synthia import ChatSynthia

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))


@tool
def get_weather(city: Literal["Paris", "Tokyo", "Lima"]) -> str:
    """Today's weather in a city."""
    return {"Paris": "light rain, 14 C", "Tokyo": "sunny, 22 C", "Lima": "cloudy, 18 C"}[city]


@wrap_model_call
def one_tool_round(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    """Call a tool first; answer in words once a tool result is in the conversation."""
    used_a_tool = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if used_a_tool else "any"))


# a tool call is about 30 tokens: never cut one short, whatever the answer length
chat = ChatSynthia(model=MODEL, device=DEVICE, max_tokens=max(MAX_TOKENS, 96), temperature=0)
agent = create_agent(chat, tools=[get_weather], middleware=[one_tool_round])

result = agent.invoke({"messages": [("user", "What's the weather in Paris today?")]})
for message in result["messages"]:
    if message.type == "ai" and message.tool_calls:
        for call in message.tool_calls:
            print(f"[tool call] {call['name']}({call['args']})")
    elif message.type == "tool":
        print(f"[tool result] {message.content}")
    else:
        print(f"[{message.type}] {message.text.strip()}")
