"""Remote mode's pure parts: server-sent events, stop cutting, backoff, GBNF translation."""

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from langchain_synthia import ChatSynthia
from langchain_synthia._gbnf import json_schema_to_gbnf, lark_to_gbnf
from langchain_synthia._grammar import GrammarError, json_schema_grammar
from langchain_synthia._remote import (
    RemoteEngine,
    RemoteEngineError,
    RemoteSettings,
    _Answer,
    _backoff,
    _Lines,
    _LineSplitter,
)
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._sampling import SamplingParams
from langchain_synthia.tools import convert_tools, tool_grammar
from tests._completions_server import CompletionsServer, Reply, event_stream, json_reply

GREEDY = SamplingParams(0.0, 1.0, 0, 1.0, None)


def sse(text: str = "", finish: str | None = None, usage: dict | None = None) -> str:
    event = {"choices": [{"text": text, "finish_reason": finish}]}
    if usage:
        event["usage"] = usage
    return f"data: {json.dumps(event)}"


def run(stops: tuple[str, ...], lines: list[str], max_tokens: int = 8) -> list:
    engine = RemoteEngine(RemoteSettings("http://x/v1", "m"))
    request = GenerationRequest("p", max_tokens, GREEDY, stops=stops)
    answer, parsed = _Answer(request, engine), _Lines(engine, request)
    events = []
    for line in lines:
        events += answer.feed(parsed.parse(line))
        if answer.done:
            break
    events += answer.end(parsed, parsed.usage or {})
    return events


def test_text_usage_and_finish_come_from_the_events() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    events = run(
        (), [sse("Hel"), "", ": keep-alive", sse("lo"), sse("!", "length"), sse(usage=usage),
             "data: [DONE]"],
    )  # fmt: skip
    assert "".join(e.text for e in events) == "Hello!"
    assert events[-1].finish_reason == "length"
    assert (events[-1].input_tokens, events[-1].output_tokens) == (7, 3)


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_stop_split_across_events_is_cut_exactly(cut: int) -> None:
    text = "one, two\nUSER: three"
    events = run(("\nUSER:",), [sse(text[:cut]), sse(text[cut:]), sse("", "stop"), "data: [DONE]"])
    assert "".join(e.text for e in events) == "one, two"
    assert events[-1].finish_reason == "stop"


def test_a_server_that_ignores_the_stop_is_left() -> None:
    lines = [sse("a."), *(sse("more") for _ in range(500))]
    events = run((".",), lines, max_tokens=1000)
    assert "".join(e.text for e in events) == "a"
    assert events[-1].finish_reason == "stop"


def test_a_stream_that_ends_without_a_finish_is_an_error() -> None:
    with pytest.raises(RemoteEngineError, match="closed the connection before the answer"):
        run((), [sse("Hel")])


def test_an_error_event_is_raised_with_its_message() -> None:
    with pytest.raises(RemoteEngineError, match="out of memory"):
        run((), [sse("a"), 'data: {"error": {"message": "out of memory"}}'])


def test_lines_come_out_whole_however_the_bytes_are_cut() -> None:
    """Any of the three line ends, any character, any cut of the bytes into chunks (blank
    lines, which server-sent events skip, may come out where CR LF is cut in two)."""
    tried = []
    chars = st.characters(exclude_characters="\r\n", exclude_categories=["Cs"])

    @settings(max_examples=300, deadline=None)
    @given(
        lines=st.lists(st.text(chars, max_size=12), max_size=8),
        ends=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=8, max_size=8),
        cuts=st.lists(st.integers(0, 200), max_size=6),
    )
    def check(lines: list[str], ends: list[str], cuts: list[int]) -> None:
        data = "".join(line + end for line, end in zip(lines, ends, strict=False)).encode()
        splitter = _LineSplitter(RemoteEngine(RemoteSettings("http://x/v1", "m")))
        got, start = [], 0
        for cut in [*sorted(cuts), len(data)]:
            got += splitter.feed(data[start:cut])
            start = max(start, cut)
        got += splitter.rest()
        assert [line for line in got if line] == [line for line in lines if line]
        tried.append(1)

    check()
    assert len(tried) >= 300


def test_a_line_longer_than_one_mib_is_refused_in_any_chunking() -> None:
    splitter = _LineSplitter(RemoteEngine(RemoteSettings("http://x/v1", "m")))
    assert splitter.feed(b"data: " + b"x" * (1 << 19)) == []
    with pytest.raises(RemoteEngineError, match="without a line break"):
        splitter.feed(b"x" * (1 << 19))
    with pytest.raises(RemoteEngineError, match="without a line break"):
        _LineSplitter(RemoteEngine(RemoteSettings("http://x/v1", "m"))).feed(
            b"ok\n" + b"x" * ((1 << 20) + 1) + b"\n"
        )


def test_backoff_doubles_with_jitter_up_to_eight_seconds() -> None:
    for attempt, base in enumerate([0.5, 1, 2, 4, 8, 8]):
        assert 0.75 * base <= _backoff(attempt) <= 1.25 * base


def test_remote_fields_are_validated_and_the_key_is_secret(monkeypatch) -> None:
    with pytest.raises(ValueError, match="is not an http"):
        ChatSynthia(base_url="localhost:8000")
    monkeypatch.setenv("SYNTHIA_BASE_URL", "http://gpu:8000/v1")
    monkeypatch.setenv("SYNTHIA_API_KEY", "sk-123")
    chat = ChatSynthia()
    assert chat.base_url == "http://gpu:8000/v1"
    assert "sk-123" not in repr(chat)
    assert chat._remote_settings(chat.model).api_key == "sk-123"


# -- GBNF --------------------------------------------------------------------------------------


class Weather(BaseModel):
    city: str = Field(max_length=20)
    days: int = 1


def test_a_tool_grammar_translates_rule_for_rule() -> None:
    lark = tool_grammar(convert_tools([Weather]), "auto")
    gbnf = lark_to_gbnf(lark)
    assert gbnf.startswith('root ::= " "? (calls | TEXT)?\n')
    assert 'call ::= "<tool_call>" (call0) "</tool_call>"' in gbnf
    assert "TEXT ::= ([^<\\x20\\t\\r\\n] [^\\x00]*)" in gbnf
    # required key first, optional days after; one space at most between JSON tokens
    assert '"{" json-space "\\"city\\"" json-space ":" json-space ' in gbnf
    assert (
        '(json-space "," json-space "\\"days\\"" json-space ":" json-space json-integer)?' in gbnf
    )
    assert 'json-space ::= " "?' in gbnf


def test_schemas_translate_to_json_rules() -> None:
    schema = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
            "note": {"type": ["string", "null"]},
        },
    }
    gbnf = json_schema_to_gbnf(schema)
    assert '"\\"a\\"" | "\\"b\\""' in gbnf
    assert '"[" ' in gbnf
    assert "{0,2}" in gbnf  # one item, then at most two more
    assert "json-string | json-null" in gbnf.replace("value-", "").replace("  ", " ") or (
        "json-null" in gbnf
    )


def test_recursive_models_terminate() -> None:
    class Node(BaseModel):
        name: str
        children: list["Node"] = []

    gbnf = lark_to_gbnf(json_schema_grammar(Node.model_json_schema()))
    assert gbnf.count("::=") < 30


def test_unsupported_lark_is_a_clear_error() -> None:
    with pytest.raises(GrammarError, match="regex"):
        lark_to_gbnf("start: /[a-z]+/")


def test_gbnf_parses_in_llama_cpp_when_it_is_installed() -> None:
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    for lark in (
        tool_grammar(convert_tools([Weather]), "auto"),
        tool_grammar(convert_tools([Weather]), "any", parallel=True),
        json_schema_grammar({"type": "object"}),
    ):
        llama_grammar.LlamaGrammar.from_string(lark_to_gbnf(lark), verbose=False)


# -- retries, against a scripted HTTP server on loopback ---------------------------------------


class _Scripted:
    """A loopback HTTP server that answers POSTs with the given statuses, then a stream."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.posts = 0
        self.server = CompletionsServer(self._complete)
        self.url = self.server.url

    def _complete(self, body: dict) -> Reply:
        self.posts += 1
        if self.statuses:
            return json_reply(self.statuses.pop(0), {"error": {"message": "busy, try later"}})
        return event_stream(
            [
                {"choices": [{"text": "Hi", "finish_reason": None}]},
                {"choices": [{"text": " there", "finish_reason": "stop"}]},
            ]
        )

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("use_async", [False, True])
def test_busy_answers_are_retried_before_the_first_token(use_async: bool) -> None:
    import asyncio

    server = _Scripted([503, 429])
    try:
        chat = ChatSynthia(base_url=server.url, model="m", max_retries=2, max_tokens=4)
        text = asyncio.run(chat.ainvoke("x")).text if use_async else chat.invoke("x").text
        assert text == "Hi there"
        assert server.posts == 3
    finally:
        server.close()


def test_a_client_error_is_not_retried_and_a_busy_server_gives_up() -> None:
    server = _Scripted([400, 503, 503, 503])
    try:
        chat = ChatSynthia(base_url=server.url, model="m", max_retries=2, max_tokens=4)
        with pytest.raises(RemoteEngineError, match="answered 400: busy, try later"):
            chat.invoke("x")
        assert server.posts == 1
        with pytest.raises(RemoteEngineError, match="answered 503") as caught:
            chat.invoke("x")
        assert caught.value.status == 503
        assert server.posts == 4
    finally:
        server.close()


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_usage_counts_wait_as_long_as_the_call_not_the_clients_ten_seconds(timeout) -> None:
    """A server that runs one request at a time answers the token counts after the answers
    queued before them (16 concurrent streams on llama-cpp-python: over 10 s on a slow
    machine). The counts may take as long as the call: no read limit without a timeout, the
    call's remaining time with one, never the client's 10 s default."""
    import httpx

    reads = []

    def server(request: httpx.Request) -> httpx.Response:
        reads.append(request.extensions["timeout"]["read"])
        text = json.loads(request.content)["input"]
        return httpx.Response(200, json={"tokens": [1] + [7] * len(text.split())})

    engine = RemoteEngine(RemoteSettings("http://x/v1", "m"))
    engine._client = httpx.Client(transport=httpx.MockTransport(server))
    request = GenerationRequest("one two three", 8, GREEDY, timeout=timeout)
    answer, lines = _Answer(request, engine), _Lines(engine, request)
    list(answer.feed(lines.parse(sse(" four five", "stop"))))
    deadline = None if timeout is None else time.monotonic() + timeout
    usage = engine._usage(request, answer, lines, deadline)
    assert usage == {"prompt_tokens": 4, "completion_tokens": 2}
    assert len(reads) == 3  # the prompt, the answer, and the BOS the tokenizer adds
    if timeout is None:
        assert reads == [None] * 3
    else:
        assert all(10.0 < read <= timeout for read in reads)
