"""Remote mode against a hostile server: deadlines, bounded memory, malformed replies.

Every test starts `tests._hostile_server.HostileServer` on loopback and calls it through the
public classes on all four paths (``invoke``, ``stream``, ``ainvoke``, ``astream``). A server
may drip bytes, never end a line or a stream, send JSON of any shape where a completion chunk
belongs, answer with an error page or a redirect, echo the API key, or ignore the grammar it
was sent: each call still ends by its deadline, in bounded memory, with an answer or a
`RemoteEngineError` (`GenerationTimeoutError` for a deadline) that never shows the key.
"""

import asyncio
import json
import time
import traceback
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessageChunk
from pydantic import BaseModel, Field

from langchain_synthia import ChatSynthia, GenerationTimeoutError, SynthiaLLM
from langchain_synthia._remote import RemoteEngineError
from tests._hostile_server import (
    HostileServer,
    answer,
    drip_body,
    echo_key,
    endless,
    no_newline,
    reply,
    silent,
    slow_headers,
    sse,
    stream,
    tokenize_words,
)

KEY = "sk-hostile-0123456789abcdef"
PATHS = ["invoke", "stream", "ainvoke", "astream"]


def chat_for(hostile: HostileServer, **fields: Any) -> ChatSynthia:
    fields = {"model": "m", "api_key": KEY, "max_retries": 0, "max_tokens": 16, **fields}
    return ChatSynthia(base_url=hostile.url, **fields)


def call(runnable: Any, path: str, prompt: str = "Hello") -> Any:
    """The answer through `path`; a stream's chunks are added up into one message."""
    if path == "invoke":
        return runnable.invoke(prompt)
    if path == "ainvoke":
        return asyncio.run(runnable.ainvoke(prompt))
    if path == "stream":
        chunks = list(runnable.stream(prompt))
    else:

        async def collect() -> list:
            return [chunk async for chunk in runnable.astream(prompt)]

        chunks = asyncio.run(collect())
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    return whole


def shown(error: BaseException) -> str:
    """Everything a traceback of `error` prints, chained causes included."""
    return "".join(traceback.format_exception(error))


# -- 11. the timeout is a deadline for the whole exchange -------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "behaviour",
    [drip_body(0.02), slow_headers(0.02), silent],
    ids=["body-dripped", "headers-dripped", "silent"],
)
def test_the_timeout_is_a_deadline_however_slowly_bytes_come(behaviour, path: str) -> None:
    """Bytes dripped a few each 20 ms (10 s for the whole reply) do not stretch timeout=1."""
    with HostileServer(behaviour) as server:
        chat = chat_for(server, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(GenerationTimeoutError, match="timeout"):
            call(chat, path)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("path", PATHS)
def test_server_detection_keeps_to_the_deadline(path: str) -> None:
    """``server="auto"`` asks ``/v1/models`` first; a dripped answer there ends at the deadline,
    and the next call (the server now answering) detects again and succeeds."""
    with HostileServer(models=drip_body(0.02)) as server:
        chat = chat_for(server, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(GenerationTimeoutError):
            call(chat, path)
        assert time.monotonic() - started < 2.0
        server.models = None
        assert call(chat, path).text == "Hi there"


@pytest.mark.parametrize("path", PATHS)
def test_usage_counting_keeps_to_the_deadline(path: str) -> None:
    """A server that streams no usage is asked to tokenize; a dripped ``/tokenize`` reply
    costs the counts (0), not the answer, and not more than the deadline."""
    no_usage = stream(sse("Hi"), sse(" there", "stop"), "data: [DONE]")
    with HostileServer(no_usage, tokenize=drip_body(0.02)) as server:
        chat = chat_for(server, timeout=1.5)
        started = time.monotonic()
        message = call(chat, path)
        assert time.monotonic() - started < 2.5
        assert message.text == "Hi there"
        assert message.usage_metadata["output_tokens"] == 0


# -- 12. bounded memory and max_tokens kept on our side -------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_line_that_never_ends_is_refused_at_one_mib(path: str) -> None:
    with HostileServer(no_newline()) as server:
        with pytest.raises(RemoteEngineError, match="without a line break") as caught:
            call(chat_for(server), path)
        assert server.sent < 8 << 20  # the client stopped reading near 1 MiB (+ buffers)
    assert KEY not in shown(caught.value)


@pytest.mark.parametrize("path", PATHS)
def test_an_endless_stream_ends_at_max_tokens_without_a_timeout(path: str) -> None:
    with HostileServer(endless()) as server:
        message = call(chat_for(server, max_tokens=5, timeout=None), path)
        assert message.text == "tok" * 5
        assert message.response_metadata["finish_reason"] == "length"
        assert message.usage_metadata["output_tokens"] == 5  # /tokenize 404: max_tokens used
        assert server.sent < 1 << 20


@pytest.mark.parametrize("path", ["invoke", "astream"])
def test_endless_empty_events_and_oversized_pieces_are_errors(path: str) -> None:
    with HostileServer(endless(sse(""))) as server:
        with pytest.raises(RemoteEngineError, match="events without ending"):
            call(chat_for(server, max_tokens=5), path)
        server.completions = answer("x" * 5000)
        with pytest.raises(RemoteEngineError, match="5000 characters for max_tokens=2"):
            call(chat_for(server, max_tokens=2), path)


def test_the_llm_class_and_batches_keep_the_same_bounds() -> None:
    """``SynthiaLLM.generate`` with several prompts streams each from a thread of its own."""
    with HostileServer(endless()) as server:
        llm = SynthiaLLM(base_url=server.url, model="m", max_tokens=3, max_retries=0)
        result = llm.generate(["a", "b", "c"])
        assert [g[0].text for g in result.generations] == ["toktoktok"] * 3
        server.completions = drip_body(0.02)
        slow = SynthiaLLM(base_url=server.url, model="m", timeout=1.0, max_retries=0)
        started = time.monotonic()
        with pytest.raises(GenerationTimeoutError):
            slow.generate(["a", "b"])
        assert time.monotonic() - started < 2.0


# -- 13. malformed payloads, error bodies, redirects, the key ---------------------------------

MALFORMED = {
    "a list": "data: [1, 2]",
    "null": "data: null",
    "a string": 'data: "text"',
    "not JSON": "data: {'text': 'hi'",
    "choices not a list": 'data: {"choices": {"text": "hi"}}',
    "a null choice": 'data: {"choices": [null]}',
    "a number as text": 'data: {"choices": [{"text": 5}]}',
    "a list as text": 'data: {"choices": [{"text": ["a"]}]}',
    "an object as finish": 'data: {"choices": [{"text": "", "finish_reason": {"a": 1}}]}',
    "a second choice": 'data: {"choices": [{"index": 1, "text": "other"}]}',
    "an error list": 'data: {"error": [1, 2]}',
    "an error number": 'data: {"error": 500}',
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_events_are_remote_engine_errors(line: str, path: str) -> None:
    events = stream(sse("Hi"), line, sse("", "stop"), "data: [DONE]")
    with HostileServer(events) as server, pytest.raises(RemoteEngineError, match="server at"):
        call(chat_for(server), path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "usage",
    [{"prompt_tokens": "many", "completion_tokens": 2}, [1, 2], "12", {"prompt_tokens": -1}],
)
def test_malformed_usage_keeps_the_answer_and_counts_again(usage: Any, path: str) -> None:
    """A usage the server got wrong is counted with its tokenizer instead; the answer stays."""
    events = stream(sse("Hi"), sse(" there", "stop"), f"data: {json.dumps({'usage': usage})}")
    with HostileServer(events, tokenize=tokenize_words) as server:
        message = call(chat_for(server), path)
        assert message.text == "Hi there"
        assert message.usage_metadata["input_tokens"] > 1
        assert message.usage_metadata["output_tokens"] == 2  # a word each, not the BOS


HTML = "<html><body><h1>502 Bad Gateway</h1></body></html>"
ERROR_PAGES = {
    "json error": (reply(200, '{"error": {"message": "model m is not loaded"}}'), "not loaded"),
    "html": (reply(200, HTML, "text/html"), "502 Bad Gateway"),
    "json as text": (
        stream('{"error": {"message": "no such model"}}', kind="text/plain"),
        "no such model",
    ),
    "redirect": (
        reply(307, "", Location="http://elsewhere:9/v1/completions"),
        "307, a redirect to http://elsewhere:9/v1/completions",
    ),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("page", ERROR_PAGES.values(), ids=ERROR_PAGES.keys())
def test_a_reply_that_is_not_a_stream_shows_the_servers_message(page: tuple, path: str) -> None:
    behaviour, message = page
    with HostileServer(behaviour) as server, pytest.raises(RemoteEngineError, match=message):
        call(chat_for(server), path)


@pytest.mark.parametrize("path", PATHS)
def test_the_api_key_never_reaches_an_error_message(path: str) -> None:
    long_echo = reply(500, f"<pre>{KEY} " + "trace line\n" * 5000 + "</pre>", "text/html")
    mid_answer = stream(sse("Hi"), json.dumps({"error": {"message": f"bad {KEY}"}}).join(
        ["data: ", ""]
    ))  # fmt: skip
    for behaviour, status in [(echo_key(401), 401), (long_echo, 500), (mid_answer, None)]:
        with HostileServer(behaviour) as server, pytest.raises(RemoteEngineError) as caught:
            call(chat_for(server), path)
        assert caught.value.status == status
        assert KEY not in shown(caught.value)
        assert "[api key]" in str(caught.value)
        assert len(str(caught.value)) < 800  # the server's message, cut


# -- tools the server was not asked for -------------------------------------------------------


class Weather(BaseModel):
    """Look up today's weather in a city."""

    city: str = Field(max_length=20)
    days: int = Field(1, ge=1, le=7)


def tool_call(body: Any, ascii_only: bool = False) -> str:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=ascii_only)
    return f"<tool_call>{text}</tool_call>"


UNBOUND = {
    "unbound tool": tool_call({"name": "delete_files", "arguments": {"path": "/"}}),
    "missing argument": tool_call({"name": "Weather", "arguments": {}}),
    "wrong type": tool_call({"name": "Weather", "arguments": {"city": 5}}),
    "unknown argument": tool_call({"name": "Weather", "arguments": {"city": "a", "rm": 1}}),
    "unfinished call": '<tool_call>{"name":"Weather","arguments":{"city":"Paris"',
    "text after the call": tool_call({"name": "Weather", "arguments": {"city": "a"}}) + " ok",
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("text", UNBOUND.values(), ids=UNBOUND.keys())
def test_a_call_outside_the_bound_tools_is_not_returned(text: str, path: str) -> None:
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    with HostileServer(answer(*pieces)) as server:
        bound = chat_for(server, max_tokens=64).bind_tools([Weather], tool_choice="any")
        calls: list = []
        with pytest.raises(RemoteEngineError, match="grammar it was sent"):
            collect_calls(bound, path, calls)
        assert calls == []  # no chunk carried a call either


def collect_calls(bound: Any, path: str, calls: list) -> None:
    """Call through `path`, adding each streamed chunk's calls to `calls` as it comes."""
    if path == "stream":
        for chunk in bound.stream("Weather?"):
            calls.extend(chunk.tool_call_chunks)
    elif path == "astream":

        async def astream() -> None:
            async for chunk in bound.astream("Weather?"):
                calls.extend(chunk.tool_call_chunks)

        asyncio.run(astream())
    else:
        calls.extend(call(bound, path).tool_calls)


@pytest.mark.parametrize("path", PATHS)
def test_calls_are_held_to_the_grammar_the_server_was_sent(path: str) -> None:
    """llama.cpp gets the grammar as GBNF, whose JSON strings take any ``\\u`` escape and
    whose integers have no bounds; vLLM gets llguidance's, which allows neither."""
    escaped = tool_call({"name": "Weather", "arguments": {"city": "Zürich"}}, ascii_only=True)
    far = tool_call({"name": "Weather", "arguments": {"city": "Oslo", "days": 30}})
    with HostileServer(answer(escaped)) as server:
        llama_cpp = chat_for(server, server="llama.cpp", max_tokens=64)
        vllm = chat_for(server, server="vllm", max_tokens=64)
        (made,) = call(llama_cpp.bind_tools([Weather]), path).tool_calls
        assert made["args"] == {"city": "Zürich"}
        with pytest.raises(RemoteEngineError, match="grammar it was sent"):
            call(vllm.bind_tools([Weather]), path)
        server.completions = answer(far)
        assert call(llama_cpp.bind_tools([Weather]), path).tool_calls[0]["args"]["days"] == 30
        with pytest.raises(RemoteEngineError, match="grammar it was sent"):
            call(vllm.bind_tools([Weather]), path)
        server.completions = answer(tool_call({"name": "delete_files", "arguments": {}}))
        with pytest.raises(RemoteEngineError, match="grammar it was sent"):
            call(llama_cpp.bind_tools([Weather]), path)


@pytest.mark.parametrize("path", PATHS)
def test_a_bound_call_and_plain_text_pass(path: str) -> None:
    good = tool_call({"name": "Weather", "arguments": {"city": "Paris", "days": 2}})
    with HostileServer(answer(" ", good[:9], good[9:])) as server:
        bound = chat_for(server, max_tokens=64).bind_tools([Weather])
        (made,) = call(bound, path, "Weather?").tool_calls
        assert (made["name"], made["args"]) == ("Weather", {"city": "Paris", "days": 2})
        server.completions = answer(" It is", " sunny.")
        assert call(bound, path, "Weather?").text == " It is sunny."


# -- /tokenize replies of the wrong shape ------------------------------------------------------

BAD_TOKENS = [
    "[1, 2, 3]",
    "null",
    '{"tokens": "1 2 3"}',
    '{"tokens": [1, "2"]}',
    '{"tokens": [1, -2]}',
    '{"tokens": [1.5]}',
    '{"ids": {"a": 1}}',
    "<html>tokenizer</html>",
]


@pytest.mark.parametrize("body", BAD_TOKENS)
def test_a_tokenize_reply_of_the_wrong_shape_is_an_error(body: str) -> None:
    with HostileServer(tokenize=reply(200, body)) as server:
        chat = chat_for(server)
        with pytest.raises(RemoteEngineError, match="no list of token ids"):
            chat.get_num_tokens("Hello")
        # without usage in the stream, the answer keeps its text and reports unknown counts
        server.completions = stream(sse("Hi"), sse("", "stop"), "data: [DONE]")
        message = chat.invoke("Hello")
        assert (message.text, message.usage_metadata["output_tokens"]) == ("Hi", 0)


# -- any JSON value where a chunk's fields belong ----------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.just(KEY),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["text", "error", "message", "a"]), children, max_size=3)
    ),
    max_leaves=6,
)
PLACES = ["event", "choices", "choice", "text", "finish_reason", "index", "usage", "counts",
          "error"]  # fmt: skip


def hostile_line(place: str, value: Any) -> str:
    choice: dict[str, Any] = {"text": "!", "finish_reason": None}
    event: Any = {"choices": [choice]}
    if place == "event":
        event = value
    elif place == "choices":
        event["choices"] = value
    elif place == "choice":
        event["choices"] = [value]
    elif place in ("text", "finish_reason", "index"):
        choice[place] = value
    elif place == "usage":
        event["usage"] = value
    elif place == "counts":
        event["usage"] = {"prompt_tokens": value, "completion_tokens": value}
    else:
        event["error"] = value
    return f"data: {json.dumps(event)}"


def test_any_json_where_a_chunk_belongs_ends_in_an_answer_or_a_remote_error() -> None:
    outcomes: Counter = Counter()
    with HostileServer(tokenize=reply(200, '{"tokens": [1, 2]}')) as server:

        @settings(max_examples=240, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            place=st.sampled_from(PLACES),
            value=json_values,
            path=st.sampled_from(PATHS),
        )
        def check(place: str, value: Any, path: str) -> None:
            lines = [sse("Hi"), hostile_line(place, value), sse("", "stop"), "data: [DONE]"]
            server.completions = stream(*lines)
            started = time.monotonic()
            message, error = None, None
            try:
                message = call(chat_for(server, timeout=5.0), path)
            except RemoteEngineError as raised:
                error = raised
            if error is not None:
                assert KEY not in shown(error)
                assert len(str(error)) < 1200
                outcomes["error", place] += 1
            else:
                assert isinstance(message.text, str)
                assert message.text.startswith("Hi")
                assert message.response_metadata["finish_reason"] == "stop"
                outcomes["answer", place] += 1
            assert time.monotonic() - started < 5.0

        check()
    total = sum(outcomes.values())
    print(f"{total} payloads: {dict(outcomes)}")
    assert total >= 240
    assert {kind for kind, _ in outcomes} == {"error", "answer"}
    assert {place for _, place in outcomes} == set(PLACES)


def test_any_tool_call_body_is_a_bound_valid_call_or_a_remote_error() -> None:
    """Calls whose name and arguments are any JSON: each call returned names a bound tool and
    its arguments validate; everything else is a `RemoteEngineError`."""
    outcomes: Counter = Counter()
    near_valid = st.fixed_dictionaries(
        {
            "name": st.just("Weather"),
            "arguments": st.fixed_dictionaries(
                {"city": st.text(max_size=22)}, optional={"days": st.integers(-2, 9)}
            ),
        }
    )
    anything = st.fixed_dictionaries(
        {
            "name": st.sampled_from(["Weather", "weather", "delete_files", ""]) | json_values,
            "arguments": st.dictionaries(st.sampled_from(["city", "days", "unit"]), json_values)
            | json_values,
        }
    )
    with HostileServer() as server:
        bound = chat_for(server, max_tokens=64).bind_tools([Weather], tool_choice="any")

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=near_valid | anything, path=st.sampled_from(PATHS))
        def check(body: dict, path: str) -> None:
            text = tool_call(body)
            server.completions = answer(*[text[i : i + 5] for i in range(0, len(text), 5)])
            message, error = None, None
            try:
                message = call(bound, path, "Weather?")
            except RemoteEngineError as raised:
                error = raised
            if error is not None:
                assert "grammar it was sent" in str(error)
                outcomes["refused"] += 1
                return
            (made,) = message.tool_calls
            assert made["name"] == "Weather"
            Weather.model_validate(made["args"])
            outcomes["valid call"] += 1

        check()
    print(f"{sum(outcomes.values())} tool calls: {dict(outcomes)}")
    assert sum(outcomes.values()) >= 150
    assert outcomes["refused"] > 0
    assert outcomes["valid call"] > 0


def test_a_stream_chunk_is_never_a_call_of_an_unbound_tool() -> None:
    """The streamed chunks, not only the final message, carry only bound calls."""
    text = tool_call({"name": "delete_files", "arguments": {}})
    with HostileServer(answer(text)) as server:
        bound = chat_for(server).bind_tools([Weather])
        seen: list[AIMessageChunk] = []
        with pytest.raises(RemoteEngineError):
            seen.extend(bound.stream("x"))
        assert not any(chunk.tool_call_chunks for chunk in seen)
