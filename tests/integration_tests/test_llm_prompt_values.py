"""`SynthiaLLM` given messages or a chat prompt's value: every entry point renders them in
Synthia's format (on the tiny checkpoint; what the model read is the prompt its callbacks get)."""

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from langchain_synthia import SynthiaLLM, render_messages
from tests.helpers import DEVICE

MESSAGES = [SystemMessage("Be brief."), HumanMessage("Name a colour."), AIMessage("Red")]
TEMPLATE = ChatPromptTemplate.from_messages(
    [("system", "Be brief."), ("human", "{q}"), ("ai", "Red")]
)


class Started(BaseCallbackHandler):
    """The prompts that each run started with."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.prompts.extend(prompts)


async def _astream(llm: SynthiaLLM, value: Any, config: dict) -> str:
    return "".join([piece async for piece in llm.astream(value, config=config)])


CALLS: dict[str, Callable[[SynthiaLLM, Any, dict], Any]] = {
    "invoke": lambda llm, value, config: llm.invoke(value, config=config),
    "stream": lambda llm, value, config: "".join(llm.stream(value, config=config)),
    "batch": lambda llm, value, config: llm.batch([value, value], config=config),
    "ainvoke": lambda llm, value, config: asyncio.run(llm.ainvoke(value, config=config)),
    "astream": lambda llm, value, config: asyncio.run(_astream(llm, value, config)),
    "abatch": lambda llm, value, config: asyncio.run(llm.abatch([value, value], config=config)),
}


@pytest.mark.parametrize("given", ["messages", "chat-prompt-value", "message-tuples"])
@pytest.mark.parametrize("call", CALLS)
def test_every_entry_point_renders_messages_in_synthias_format(
    tiny_model: str, call: str, given: str
) -> None:
    llm = SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=1, temperature=0)
    value = {
        "messages": MESSAGES,
        "chat-prompt-value": TEMPLATE.invoke({"q": "Name a colour."}),
        "message-tuples": [("system", "Be brief."), ("human", "Name a colour."), ("ai", "Red")],
    }[given]
    started = Started()
    CALLS[call](llm, value, {"callbacks": [started]})
    assert started.prompts
    assert set(started.prompts) == {render_messages(MESSAGES)}


def test_generate_prompt_renders_chat_prompt_values(tiny_model: str) -> None:
    llm = SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=1, temperature=0)
    chat_value = TEMPLATE.invoke({"q": "Name a colour."})
    text_value = TEMPLATE.invoke({"q": "Name a colour."}).to_string()
    for result in (
        llm.generate_prompt([chat_value, chat_value]),
        asyncio.run(llm.agenerate_prompt([chat_value])),
    ):
        usage = result.generations[0][0].generation_info["usage_metadata"]
        direct = llm.generate([render_messages(MESSAGES)]).generations[0][0]
        assert usage == direct.generation_info["usage_metadata"]
    started = Started()
    llm.generate_prompt([TEMPLATE.format_prompt(q="Hi")], callbacks=[started])
    assert started.prompts == [render_messages([*MESSAGES[:1], HumanMessage("Hi"), MESSAGES[2]])]
    assert "Human:" in text_value  # a string stays as it is (LangChain's text, here)
    llm.invoke(text_value, config={"callbacks": [started]})
    assert started.prompts[-1] == text_value


def test_a_message_list_without_a_system_message_gets_the_cards(tiny_model: str) -> None:
    llm = SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=1, temperature=0)
    started = Started()
    llm.invoke([HumanMessage("Hi")], config={"callbacks": [started]})
    assert started.prompts == [render_messages([HumanMessage("Hi")])]
    assert started.prompts[0].startswith("SYSTEM: You are Synthia.")


def test_an_empty_message_list_is_refused_naming_the_llm(tiny_model: str) -> None:
    llm = SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=1)
    with pytest.raises(ValueError, match="SynthiaLLM got an empty message list"):
        llm.invoke([])
