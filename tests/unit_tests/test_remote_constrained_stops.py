"""Remote mode: stops cut free text on our side, never a call, whatever the server does with them.

A loopback server plays vLLM: it streams a scripted answer and, like vLLM, ends it at the first
stop string it was sent (text before the stop, ``finish_reason: "stop"``).
"""

import asyncio
import json
from collections.abc import Iterator
from typing import Literal

import pytest
from pydantic import BaseModel

from langchain_synthia import ChatSynthia
from langchain_synthia.tools import render_tool_call
from tests._completions_server import CompletionsServer, Reply, event_stream

TEXT = "Meet at 10.30\nUSER: bring </tool_call> notes."


class Note(BaseModel):
    """Take a note."""

    text: Literal["Meet at 10.30\nUSER: bring </tool_call> notes."]


def chunk(text: str = "", finish: str | None = None) -> dict:
    return {"choices": [{"text": text, "finish_reason": finish}]}


class VllmLike:
    """Streams `answer` in pieces of 3 characters, cut at the first stop it was sent."""

    def __init__(self) -> None:
        self.answer = ""
        self.bodies: list[dict] = []
        self.server = CompletionsServer(self._complete)
        self.url = self.server.url

    def _complete(self, body: dict) -> Reply:
        self.bodies.append(body)
        text = self.answer
        found = [text.find(s) for s in body.get("stop") or [] if s in text]
        text = text[: min(found)] if found else text
        pieces = [chunk(text[i : i + 3]) for i in range(0, len(text), 3)]
        return event_stream([*pieces, chunk("", "stop")])


@pytest.fixture
def server() -> Iterator[VllmLike]:
    server = VllmLike()
    yield server
    server.server.close()


@pytest.fixture
def chat(server: VllmLike) -> ChatSynthia:
    return ChatSynthia(base_url=server.url, model="m", max_tokens=64, max_retries=0)


def ask(chat, how: str, **kwargs):
    if how == "ainvoke":
        return asyncio.run(chat.ainvoke("x", **kwargs))
    if how == "stream":
        parts = list(chat.stream("x", **kwargs))
        whole = parts[0]
        for part in parts[1:]:
            whole = whole + part
        return whole
    return chat.invoke("x", **kwargs)


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
@pytest.mark.parametrize("choice", ["auto", "Note"])
def test_a_call_is_whole_under_stops_inside_it(
    server: VllmLike, chat: ChatSynthia, how: str, choice: str
) -> None:
    server.answer = render_tool_call("Note", {"text": TEXT})
    bound = chat.bind_tools([Note], tool_choice=choice)
    message = ask(bound, how, stop=[".", "</tool_call>"])
    assert [c["args"] for c in message.tool_calls] == [{"text": TEXT}]
    assert message.invalid_tool_calls == []
    assert "stop" not in server.bodies[-1]  # the server would cut inside the call


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
def test_structured_output_is_whole_under_stops_inside_it(
    server: VllmLike, chat: ChatSynthia, how: str
) -> None:
    server.answer = json.dumps({"text": TEXT}, separators=(",", ":"))
    structured = chat.model_copy(update={"stop": ["."]}).with_structured_output(Note)
    if how == "stream":
        answer = list(structured.stream("x", stop=["USER:"]))[-1]
    elif how == "ainvoke":
        answer = asyncio.run(structured.ainvoke("x", stop=["USER:"]))
    else:
        answer = structured.invoke("x", stop=["USER:"])
    assert answer == Note(text=TEXT)
    assert "stop" not in server.bodies[-1]


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
def test_free_text_under_auto_is_cut_on_our_side(
    server: VllmLike, chat: ChatSynthia, how: str
) -> None:
    server.answer = "Sure. I will note it.\nUSER: thanks"
    message = ask(chat.bind_tools([Note]), how, stop=["note"])
    assert message.content == "Sure. I will "
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.tool_calls == message.invalid_tool_calls == []
    plain = ask(chat, how, stop=["note"])  # no grammar: the server is sent the stops
    assert plain.content == "Sure. I will "
    assert server.bodies[-1]["stop"] == ["note", "\nUSER:", "USER:"]
