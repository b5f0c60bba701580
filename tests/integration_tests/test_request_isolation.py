"""One request's bad input, settings or failure ends that request only, and nothing hangs.

Each test puts a bad request beside good ones that decode at the same time (in the fast
engine's continuous batch, or in one padded batch of the transformers engine): the bad one
fails with its own error, the others return exactly what they return alone, and the engine
comes back idle. Calls that could hang run in a thread with a deadline, so that a hang is a
failure and not a stuck test run.
"""

import asyncio
import contextvars
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage

from langchain_synthia import ChatSynthia, GenerationTimeoutError, SynthiaLLM
from langchain_synthia._batching import batch_group, open_stream
from langchain_synthia._decoding_row import DecodingRow
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._sampling import BatchSampler, SamplingParams
from langchain_synthia._token_stream import EngineStoppedError, TokenStream
from langchain_synthia._transformers_engine import TransformersEngine
from tests.helpers import (
    DEVICE,
    LONG,
    NO_STOP,
    busy_rows,
    engine_of_chat,
    fast_chat,
    is_idle,
    step_log,
    wait_until,
)

HANG = 60.0
"""Seconds a call may take before the test counts it as hung (they take well under one)."""

NEIGHBOURS = ["rockets rockets rockets", "oceans oceans oceans", "bees bees bees"]
"""Prompts decoded beside the bad request; their answers must not change."""

POISON = "poison poison poison"
"""The prompt of the request that fails."""

SURROGATE = "bad \udcff text"
"""A str that is not text: a lone surrogate (UTF-8 cannot encode it)."""


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call`'s result (or its error, raised), failing the test if it takes over `seconds`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call hung (still running after {seconds} s)"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture
def chat(tiny_model: str) -> ChatSynthia:
    """The fast engine (the same settings, hence the same engine, as test_concurrency's)."""
    return fast_chat(tiny_model, max_batch_size=8, max_tokens=10, timeout=60, system_message=None)


def chat_on(engine: str, tiny_model: str) -> ChatSynthia:
    if engine == "fast":
        return fast_chat(
            tiny_model, max_batch_size=8, max_tokens=10, timeout=60, system_message=None
        )
    return ChatSynthia(
        model=tiny_model, device=DEVICE, engine="transformers", max_tokens=10,
        temperature=0, timeout=60, system_message=None,
    )  # fmt: skip


def texts(results: list) -> list:
    """Each result's text, or the error itself."""
    return [r.content if isinstance(r, AIMessage) else r for r in results]


# -- class 3: a bad option fails its own call only -------------------------------------------


BAD_OPTIONS = [
    ({"seed": 2**64}, "seed=18446744073709551616 is out of range"),
    ({"seed": -1}, "seed=-1 is out of range"),
    ({"max_tokens": True}, "max_tokens=True is not valid.*got the bool True"),
    ({"top_k": False}, "top_k=False is not valid.*bool"),
    ({"temperature": float("nan")}, "temperature=nan is not valid.*NaN"),
    ({"timeout": True}, "timeout=True is not valid.*bool"),
]


def test_bad_options_fail_their_call_while_three_others_decode(chat: ChatSynthia) -> None:
    engine = engine_of_chat(chat)
    alone = [chat.invoke(p, max_tokens=40, **NO_STOP).content for p in NEIGHBOURS]
    answers: dict[int, str] = {}

    def neighbour(index: int) -> None:
        answers[index] = chat.invoke(NEIGHBOURS[index], max_tokens=40, **NO_STOP).content

    with step_log(engine, busy_rows) as steps:
        threads = [threading.Thread(target=neighbour, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: len(steps) > 0 and len(steps[-1]) == 3)
        for options, match in BAD_OPTIONS:
            with pytest.raises(ValueError, match=match):
                within(HANG, lambda options=options: chat.invoke(POISON, **options))
        for thread in threads:
            thread.join(HANG)
    assert [answers[i] for i in range(3)] == alone
    assert wait_until(lambda: is_idle(engine))


def test_a_top_k_past_the_vocabulary_keeps_every_token(chat: ChatSynthia) -> None:
    sampled = {"temperature": 1.0, "top_p": 1.0, "seed": 7, **NO_STOP}
    every_token = chat.invoke(NEIGHBOURS[0], top_k=0, **sampled).content
    for top_k in (32000, 10**6, 2**63, 2**70):
        assert chat.invoke(NEIGHBOURS[0], top_k=top_k, **sampled).content == every_token


def test_the_largest_seed_works(chat: ChatSynthia) -> None:
    options = {"temperature": 1.0, "seed": 2**64 - 1, **NO_STOP}
    first = chat.invoke(NEIGHBOURS[0], **options).content
    assert first
    assert chat.invoke(NEIGHBOURS[0], **options).content == first


@pytest.mark.parametrize("timeout", [math.inf, 1e10, 1e300])
@pytest.mark.parametrize("method", ["invoke", "stream", "ainvoke", "astream"])
def test_an_infinite_or_huge_timeout_is_no_limit(
    chat: ChatSynthia, method: str, timeout: float
) -> None:
    expected = chat.invoke(NEIGHBOURS[1]).content

    async def acall() -> str:
        if method == "ainvoke":
            return (await chat.ainvoke(NEIGHBOURS[1], timeout=timeout)).content
        return "".join([c.content async for c in chat.astream(NEIGHBOURS[1], timeout=timeout)])

    def call() -> str:
        if method == "invoke":
            return chat.invoke(NEIGHBOURS[1], timeout=timeout).content
        if method == "stream":
            return "".join(c.content for c in chat.stream(NEIGHBOURS[1], timeout=timeout))
        return asyncio.run(acall())

    assert within(HANG, call) == expected
    assert ChatSynthia(timeout=timeout).timeout == (None if math.isinf(timeout) else timeout)


# -- defence in depth: a failure inside the engine ends its own request ----------------------


class Injected(RuntimeError):
    """The failure a test plants in one request's setup or decoding."""


@pytest.fixture
def fail_poison(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """Make the engine fail `POISON`'s request at one stage: ``setup`` (the sampler takes its
    settings) or ``decode`` (its third token)."""
    stage = request.param
    poison_ids: list[list[int]] = []
    if stage == "setup":
        assign = BatchSampler.assign

        def failing_assign(self: BatchSampler, row: int, params: Any, prompt: Any) -> None:
            if list(prompt) in poison_ids:
                raise Injected("the sampler could not take this request")
            assign(self, row, params, prompt)

        monkeypatch.setattr(BatchSampler, "assign", failing_assign)
        encode = LocalEngine.encode

        def encode_spy(self: LocalEngine, text: str) -> list[int]:
            ids = encode(self, text)
            if POISON in text:
                poison_ids.append(ids)
            return ids

        monkeypatch.setattr(LocalEngine, "encode", encode_spy)
    else:
        advance = DecodingRow.advance

        def failing_advance(self: DecodingRow, token_id: int, eos_id: int | None) -> None:
            if POISON in self.stream.request.prompt and self.generated == 2:
                raise Injected("this request's token could not be decoded")
            advance(self, token_id, eos_id)

        monkeypatch.setattr(DecodingRow, "advance", failing_advance)
    return stage


@pytest.mark.parametrize("fail_poison", ["setup", "decode"], indirect=True)
@pytest.mark.parametrize("engine", ["fast", "transformers"])
def test_a_request_that_fails_inside_the_engine_fails_alone(
    tiny_model: str, engine: str, fail_poison: str
) -> None:
    chat = chat_on(engine, tiny_model)
    alone = [chat.invoke(p, **NO_STOP).content for p in NEIGHBOURS]
    prompts = [NEIGHBOURS[0], POISON, NEIGHBOURS[1], NEIGHBOURS[2]]
    results = within(HANG, lambda: chat.batch(prompts, return_exceptions=True, **NO_STOP))
    got = texts(results)
    assert isinstance(got[1], Injected), got
    assert [got[0], got[2], got[3]] == alone
    assert chat.invoke(NEIGHBOURS[0], **NO_STOP).content == alone[0]  # the engine goes on
    if engine == "fast":
        assert wait_until(lambda: is_idle(engine_of_chat(chat)))


def test_a_reader_whose_decoding_thread_died_gets_an_error_not_a_hang(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = chat_on("transformers", tiny_model)
    chat.invoke("warm up")  # loaded before the worker is broken
    monkeypatch.setattr(TransformersEngine, "_run", lambda self, rows: None)  # dies saying nothing
    began = time.monotonic()
    for call in (lambda: chat.invoke(POISON), lambda: asyncio.run(chat.ainvoke(POISON))):
        with pytest.raises(EngineStoppedError, match="stopped without finishing this request"):
            within(HANG, call)
    assert time.monotonic() - began < 10


# -- class 4: no input hangs a batch -----------------------------------------------------------


@pytest.mark.parametrize("engine", ["fast", "transformers"])
@pytest.mark.parametrize("method", ["batch", "abatch"])
def test_a_lone_surrogate_fails_its_own_slot_of_a_chat_batch(
    tiny_model: str, engine: str, method: str
) -> None:
    chat = chat_on(engine, tiny_model)
    alone = [chat.invoke(p).content for p in NEIGHBOURS[:2]]
    inputs = [NEIGHBOURS[0], SURROGATE, NEIGHBOURS[1]]
    if method == "batch":
        results = within(HANG, lambda: chat.batch(inputs, return_exceptions=True))
    else:
        results = within(HANG, lambda: asyncio.run(chat.abatch(inputs, return_exceptions=True)))
    got = texts(results)
    assert [got[0], got[2]] == alone
    assert isinstance(got[1], ValueError)
    assert "lone surrogate" in str(got[1])
    assert "errors='replace'" in str(got[1])


@pytest.mark.parametrize("method", ["batch", "abatch"])
def test_a_lone_surrogate_fails_its_own_slot_of_an_llm_batch(tiny_model: str, method: str) -> None:
    llm = SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=10, temperature=0, timeout=60)
    alone = [llm.invoke(p) for p in NEIGHBOURS[:2]]
    inputs = [NEIGHBOURS[0], SURROGATE, NEIGHBOURS[1]]
    if method == "batch":
        got = within(HANG, lambda: llm.batch(inputs, return_exceptions=True))
    else:
        got = within(HANG, lambda: asyncio.run(llm.abatch(inputs, return_exceptions=True)))
    assert [got[0], got[2]] == alone
    assert isinstance(got[1], ValueError)
    assert "lone surrogate" in str(got[1])


class FakeEngine(LocalEngine):
    """An engine without a model whose requests fail where a test says."""

    def __init__(self, plan: dict[str, BaseException | None], start_error: BaseException | None):
        self.plan, self.start_error, self.started = plan, start_error, []

    def row_for(self, request: GenerationRequest) -> Any:
        error = self.plan[request.prompt]
        if error is not None:
            raise error
        return _FakeRow(TokenStream(request, 1))

    def start(self, rows: list) -> None:
        if self.start_error is not None:
            raise self.start_error
        self.started.extend(rows)


class _FakeRow:
    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream


ERRORS = st.sampled_from(
    [None, None, ValueError("too long"), TypeError("not text"), RuntimeError("grammar"),
     KeyError("token"), UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogate")]
)  # fmt: skip
PLANS: list[tuple[int, bool]] = []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    errors=st.lists(ERRORS, min_size=1, max_size=5),
    start_fails=st.booleans(),
    missing=st.integers(min_value=0, max_value=1),
)
def test_every_request_of_a_batch_group_gets_its_stream_or_its_own_error(
    errors: list[BaseException | None], start_fails: bool, missing: int
) -> None:
    """Property: whatever fails where, every request of a group returns at once, each with
    its own error, or its stream; requests that failed before joining delay it, never hang it.
    """
    prompts = [f"p{i}" for i in range(len(errors))]
    plan = dict(zip(prompts, errors, strict=True))
    engine = FakeEngine(plan, RuntimeError("start") if start_fails else None)
    request = {p: GenerationRequest(p, 4, SamplingParams(0.0, 1.0, 0, 1.0, 0)) for p in prompts}
    outcomes: dict[str, Any] = {}

    def call(prompt: str) -> None:
        try:
            outcomes[prompt] = open_stream(engine, request[prompt])
        except BaseException as error:
            outcomes[prompt] = error

    with batch_group(len(prompts) + missing):  # `missing` inputs never reach the engine
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(call, p)) for p in prompts
        ]  # each in the group's context, as LangChain's batch threads are
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert all(not thread.is_alive() for thread in threads), "a request of the batch hung"
    assert len(engine.started) == (0 if start_fails else errors.count(None))  # one batch
    for prompt, error in zip(prompts, errors, strict=True):
        if error is not None:
            assert outcomes[prompt] is error
        elif start_fails:
            assert str(outcomes[prompt]) == "start"
        else:
            assert isinstance(outcomes[prompt], TokenStream)
            assert outcomes[prompt].request.prompt == prompt
    PLANS.append((len(prompts), start_fails))


def test_the_batch_group_property_tried_varied_plans() -> None:
    if not PLANS:
        pytest.skip("run together with the property above")
    assert len(PLANS) >= 30
    assert {fails for _, fails in PLANS} == {True, False}


# -- class 5 and issue #22: SynthiaLLM's calls of several prompts ------------------------------


@pytest.fixture
def fast_llm(tiny_model: str) -> SynthiaLLM:
    """SynthiaLLM on the fast engine (the same engine as the chat fixture's)."""
    return SynthiaLLM(
        model=tiny_model, device=DEVICE, engine="fast", max_batch_size=8, max_tokens=10,
        temperature=0, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["generate", "agenerate"])
def test_a_generate_that_times_out_stops_every_prompt(fast_llm: SynthiaLLM, method: str) -> None:
    engine = fast_llm._engine_for(fast_llm.model, fast_llm.revision)
    prompts = [f"{p} {method}" for p in NEIGHBOURS]
    assert wait_until(lambda: is_idle(engine))

    def call() -> Any:
        if method == "generate":
            return fast_llm.generate(prompts, timeout=0.3, **LONG)
        return asyncio.run(fast_llm.agenerate(prompts, timeout=0.3, **LONG))

    with step_log(engine, busy_rows) as steps:
        with pytest.raises(GenerationTimeoutError):
            within(HANG, call)
        stopped_at = len(steps)
        freed = wait_until(lambda: is_idle(engine))
    rows = [row for row in steps.submitted if row.stream.request.prompt in prompts]
    assert len(rows) == 3
    later = [sum(row in busy for busy in steps[stopped_at:]) for row in rows]
    assert freed, f"rows still decoding: {later}"
    assert max(later) <= 2, later
    assert all(row.generated < LONG["max_tokens"] for row in rows)


@pytest.mark.parametrize("engine", ["fast", "transformers"])
@pytest.mark.parametrize("method", ["batch", "abatch"])
def test_an_llm_batch_fails_only_the_prompt_too_long(
    tiny_model: str, engine: str, method: str, batches: list[int]
) -> None:
    llm = SynthiaLLM(
        model=tiny_model, device=DEVICE, engine=engine, max_batch_size=8, max_tokens=10,
        temperature=0, timeout=60,
    )  # fmt: skip
    alone = [llm.invoke(p) for p in NEIGHBOURS]
    batches.clear()
    inputs = [NEIGHBOURS[0], "word " * 5000, NEIGHBOURS[1], NEIGHBOURS[2]]
    if method == "batch":
        got = within(HANG, lambda: llm.batch(inputs, return_exceptions=True))
    else:
        got = within(HANG, lambda: asyncio.run(llm.abatch(inputs, return_exceptions=True)))
    assert [got[0], got[2], got[3]] == alone
    assert isinstance(got[1], ValueError)
    assert "context window is 4096 tokens" in str(got[1])
    if engine == "transformers":
        assert batches == [3]  # the other three still decode as one padded batch
    with pytest.raises(ValueError, match="context window"):
        within(HANG, lambda: llm.batch(inputs))
