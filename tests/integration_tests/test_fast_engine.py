"""The fast engine on the tiny checkpoint: its network against transformers', and its scheduler.

On the CPU (CI) `FastMistral` runs the plain-torch references instead of the Triton kernels
(tests/kernel_tests/ checks the kernels against those references), so these tests check
everything else: the network's arithmetic and KV cache, cache rows decoded together, and the
scheduler (continuous batching, queueing, cancellation) behind ``ChatSynthia(engine="fast")``.
"""

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from langchain_core.messages import HumanMessage

from langchain_synthia import ChatSynthia, render_messages
from langchain_synthia._fast_model import FastMistral
from tests.helpers import DEVICE, TokenCounter, engine_of, fast_chat, rel

pytestmark = pytest.mark.gpu  # the GPU tier: SYNTHIA_TEST_DEVICE=cuda pytest -m gpu

LOGITS_REL = 1e-2
"""‖fast - transformers‖ / ‖transformers‖ of a step's logits (fp16 noise: ~4e-3 on the CPU)."""


def fast_model(tiny_model: str, max_batch: int = 4, max_len: int = 256) -> FastMistral:
    """A model of our own (the engines' models belong to their scheduler threads)."""
    model = FastMistral(
        Path(tiny_model), torch.device(DEVICE), max_batch=max_batch, max_len=max_len
    )
    model.allocate_kv_rows()
    return model


def prompt_ids(tiny_model: str, question: str) -> list[int]:
    return engine_of(tiny_model, "transformers").encode(render_messages([HumanMessage(question)]))


@pytest.fixture
def chat(tiny_model: str) -> ChatSynthia:
    return fast_chat(tiny_model)


# -- the network ---------------------------------------------------------------------------------


def test_logits_match_transformers_under_teacher_forcing(tiny_model: str) -> None:
    reference = engine_of(tiny_model, "transformers")
    model = fast_model(tiny_model)
    ids = prompt_ids(tiny_model, "How is a rocket launched?")
    cache_arg = reference._cache_arg
    with torch.inference_mode():
        out = reference.model(input_ids=torch.tensor([ids], device=DEVICE), use_cache=True)
        expected, cache = out["logits"][0, -1], out[cache_arg]
        got = model.prefill(0, ids)
        errors, agree = [rel(got, expected)], [int(got.argmax()) == int(expected.argmax())]
        position = len(ids)
        for _ in range(8):  # feed the reference's own tokens
            token = int(expected.argmax())
            out = reference.model(
                input_ids=torch.tensor([[token]], device=DEVICE),
                use_cache=True,
                **{cache_arg: cache},
            )
            expected, cache = out["logits"][0, -1], out[cache_arg]
            tokens = torch.tensor([token], device=DEVICE)
            got = model.decode(1, tokens, torch.tensor([position], device=DEVICE))[0]
            errors.append(rel(got, expected))
            agree.append(int(got.argmax()) == int(expected.argmax()))
            position += 1
    assert max(errors) < LOGITS_REL, errors
    assert all(agree), agree


def test_rows_decoded_together_equal_each_row_decoded_alone(tiny_model: str) -> None:
    model = fast_model(tiny_model)
    questions = ["Hi", "Tell me about the history of rockets, please.", "Why is the sky blue?"]
    prompts = [prompt_ids(tiny_model, q) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    steps = 6
    with torch.inference_mode():
        first = [model.prefill(slot, p) for slot, p in enumerate(prompts)]
        tokens = torch.stack([x.argmax() for x in first])
        positions = torch.tensor([len(p) for p in prompts], device=DEVICE)
        fed, together = [tokens], []
        for _ in range(steps):
            logits = model.decode(3, tokens, positions).clone()
            together.append(logits)
            tokens, positions = logits.argmax(-1), positions + 1
            fed.append(tokens)
        for row, prompt in enumerate(prompts):
            alone = model.prefill(0, prompt)  # row 0 of the cache, now for this prompt alone
            assert rel(alone, first[row]) < 1e-3
            position = torch.tensor([len(prompt)], device=DEVICE)
            for step in range(steps):
                logits = model.decode(1, fed[step][row : row + 1], position)[0]
                # fp16 noise only (~7e-4: batched matmuls round differently); mixed rows are O(1)
                assert rel(logits, together[step][row]) < 5e-3, (row, step)
                assert int(logits.argmax()) == int(together[step][row].argmax())
                position = position + 1


# -- ChatSynthia on the fast engine --------------------------------------------------------------


def test_every_way_of_calling_gives_the_same_answer_and_exact_usage(
    chat: ChatSynthia, tiny_model: str
) -> None:
    assert chat._engine_for(chat.model, chat.revision).kind == "fast"
    question = "Tell me about AI"
    prompt_tokens = len(prompt_ids(tiny_model, question))
    usage = {"input_tokens": prompt_tokens, "output_tokens": 20, "total_tokens": prompt_tokens + 20}

    counter = TokenCounter()
    message = chat.invoke(question, config={"callbacks": [counter]})
    assert message.usage_metadata == usage
    assert message.response_metadata["finish_reason"] == "length"
    assert message.response_metadata["model_name"] == tiny_model
    assert len(counter.tokens) == 20
    assert "".join(counter.tokens) == message.content

    counter = TokenCounter()
    chunks = list(chat.stream(question, config={"callbacks": [counter]}))
    assert "".join(c.content for c in chunks) == message.content
    assert [c.usage_metadata for c in chunks if c.usage_metadata] == [usage]
    assert len(counter.tokens) == 20

    async def both() -> tuple:
        streamed = [c async for c in chat.astream(question)]
        return (await chat.ainvoke(question)), streamed

    amessage, achunks = asyncio.run(both())
    assert amessage.content == message.content
    assert amessage.usage_metadata == usage
    assert "".join(c.content for c in achunks) == message.content

    others = ["Hi", "Why is the sky blue?"]
    batch = chat.batch([question, *others])
    assert [m.content for m in batch] == [message.content] + [
        chat.invoke(q).content for q in others
    ]
    assert [m.usage_metadata["input_tokens"] for m in batch] == [
        len(prompt_ids(tiny_model, q)) for q in (question, *others)
    ]


def test_greedy_tokens_equal_a_plain_decode_loop(tiny_model: str) -> None:
    """The scheduler feeds each token at the right position: same tokens as a hand-run loop."""
    model = fast_model(tiny_model, max_batch=1)
    ids = prompt_ids(tiny_model, "How is a rocket launched?")
    expected = []
    with torch.inference_mode():
        logits = model.prefill(0, ids)
        for position in range(len(ids), len(ids) + 24):
            expected.append(int(logits.argmax()))
            tokens = torch.tensor(expected[-1:], device=DEVICE)
            logits = model.decode(1, tokens, torch.tensor([position], device=DEVICE))[0]
    chat = fast_chat(tiny_model, max_tokens=24, repetition_penalty=1.0, stop_at_user_turn=False)
    chunks = list(chat._stream([HumanMessage("How is a rocket launched?")]))
    assert len(chunks) == 24
    tokenizer = chat._engine_for(chat.model, chat.revision).tokenizer
    assert "".join(c.message.content for c in chunks) == tokenizer.decode(
        expected, skip_special_tokens=True
    )


def test_multi_token_stop_is_honoured_and_not_returned(chat: ChatSynthia) -> None:
    full = chat.invoke("Hello there", max_tokens=40).content
    words = full.split()
    assert len(words) > 4
    stop = " ".join(words[2:4])  # spans several tokens, mid-answer
    expected = full[: full.index(stop)]
    message = chat.invoke("Hello there", stop=[stop], max_tokens=40)
    assert message.content == expected
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.usage_metadata["output_tokens"] < 40
    streamed = "".join(c.content for c in chat.stream("Hello there", stop=[stop], max_tokens=40))
    assert streamed == expected


def test_equal_seeds_give_equal_samples(tiny_model: str) -> None:
    chat = fast_chat(tiny_model, max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    a = chat.invoke("Hi").content
    assert chat.invoke("Hi").content == a
    assert [m.content for m in chat.batch(["Hi", "Hi"])] == [a, a]
    assert any(chat.invoke("Hi", seed=s).content != a for s in (8, 9, 10))


# -- the scheduler -------------------------------------------------------------------------------


def test_requests_join_a_running_decode_and_finish_as_if_alone(
    chat: ChatSynthia, tiny_model: str, monkeypatch
) -> None:
    long_options = {"max_tokens": 300, "stop_at_user_turn": False}
    questions = ["one", "two two", "three three three"]
    alone_long = chat.invoke("Tell me a long story", **long_options)
    assert alone_long.response_metadata["finish_reason"] == "length"  # it runs all 300 steps
    alone = [chat.invoke(q).content for q in questions]

    engine = chat._engine_for(chat.model, chat.revision)
    # requests decoding at each step, counted at the scheduler (on CUDA a step replays a graph
    # and never calls `model.decode`)
    sizes: list[int] = []
    step = engine._step
    monkeypatch.setattr(
        engine, "_step", lambda: (sizes.append(sum(r is not None for r in engine._slots)), step())
    )
    started, finished = threading.Event(), threading.Event()
    pieces: list[str] = []

    def long_stream() -> None:
        for chunk in chat.stream("Tell me a long story", **long_options):
            pieces.append(chunk.content)
            if len(pieces) == 5:
                started.set()
        finished.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(30)
    with ThreadPoolExecutor(3) as pool:
        joined = list(pool.map(lambda q: chat.invoke(q).content, questions))
    joined_while_running = not finished.is_set()
    thread.join(60)
    assert joined == alone
    assert "".join(pieces) == alone_long.content
    assert joined_while_running, "the long stream ended before the others finished"
    assert max(sizes) >= 2, "no step decoded several requests together"


def test_more_requests_than_rows_queue_and_all_finish(tiny_model: str) -> None:
    chat = fast_chat(tiny_model, max_batch_size=2, max_tokens=15)
    engine = chat._engine_for(chat.model, chat.revision)
    assert engine.model.max_batch == 2
    questions = ["a", "bb bb", "ccc ccc ccc", "Why is the sky blue?", "Tell me about AI"]
    alone = [chat.invoke(q) for q in questions]
    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(chat.invoke, questions))
    assert [m.content for m in together] == [m.content for m in alone]
    for question, message in zip(questions, together, strict=True):
        prompt_tokens = len(prompt_ids(tiny_model, question))
        assert message.usage_metadata == {
            "input_tokens": prompt_tokens,
            "output_tokens": 15,
            "total_tokens": prompt_tokens + 15,
        }


def test_a_cancelled_stream_frees_its_row(tiny_model: str) -> None:
    chat = fast_chat(tiny_model, max_batch_size=1, stop_at_user_turn=False)
    engine = chat._engine_for(chat.model, chat.revision)
    for chunk in chat.stream("Go on and on", max_tokens=4000):
        if chunk.content:
            break
    # the only row must come back: otherwise this waits in the queue until the timeout
    message = chat.invoke("Short", max_tokens=3, timeout=30)
    assert message.usage_metadata["output_tokens"] == 3
    deadline = time.monotonic() + 5
    while any(row is not None for row in engine._slots):
        assert time.monotonic() < deadline, "a finished request kept its cache row"
        time.sleep(0.01)


def test_prompt_longer_than_the_context_window_is_refused(chat: ChatSynthia) -> None:
    with pytest.raises(
        ValueError, match=r"The prompt is \d+ tokens but Synthia's context window is 4096"
    ):
        chat.invoke("word " * 5000)
    assert chat.invoke("Hi", max_tokens=2).usage_metadata["output_tokens"] == 2


def test_answer_is_capped_by_the_cache_length(tiny_model: str) -> None:
    chat = fast_chat(tiny_model, max_tokens=80, context_window=64, stop_at_user_turn=False)
    assert chat._engine_for(chat.model, chat.revision).model.max_len == 64
    message = chat.invoke("Hi")
    assert message.usage_metadata["total_tokens"] == 64
    assert message.response_metadata["finish_reason"] == "length"


def prefix_chats(tiny_model: str, documents: int, max_tokens: int) -> tuple:
    """A system message of `documents` lines, and two chats: with prefix caching, without."""
    docs = " ".join(
        f"Document {i}: rockets carry payloads to orbit in stages." for i in range(documents)
    )
    settings = {"model": tiny_model, "device": DEVICE, "engine": "fast", "temperature": 0,
                "max_tokens": max_tokens, "stop_at_user_turn": False, "timeout": 30}  # fmt: skip
    return docs, ChatSynthia(**settings), ChatSynthia(**settings, prefix_caching=False)


@contextlib.contextmanager
def suffix_steps(engine) -> Iterator[list]:
    """The prompt rests that `engine` runs as captured suffix steps inside this block."""
    rests: list = []
    run = engine._prefill_suffix
    engine._prefill_suffix = lambda *args: rests.append(args[1]) or run(*args)
    try:
        yield rests
    finally:
        del engine._prefill_suffix


def test_a_shared_prefix_is_reused_and_changes_nothing(tiny_model: str) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    docs, cached, plain = prefix_chats(tiny_model, documents=60, max_tokens=16)
    first = [SystemMessage(docs), HumanMessage("What is a payload?")]
    second = [SystemMessage(docs), HumanMessage("How many stages are there?")]
    assert cached.invoke(first).content == plain.invoke(first).content
    engine = cached._engine_for(cached.model, cached.revision)
    before = engine.prefix_hit_tokens
    with suffix_steps(engine) as rests:
        answer = cached.invoke(second)
    assert engine.prefix_hit_tokens - before >= 512  # most of the ~1,000-token prefix
    assert len(rests) == 1  # the rest of the prompt: one decode-shaped step
    assert 0 < len(rests[0]) <= 128
    assert answer.content == plain.invoke(second).content
    assert answer.usage_metadata == plain.invoke(second).usage_metadata
    assert plain._engine_for(plain.model, plain.revision).prefix_hit_tokens == 0


def test_a_long_rest_after_a_shared_prefix_is_prefilled_in_passes(tiny_model: str) -> None:
    """A rest too long for the captured suffix steps goes through the prefill passes."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_synthia._fast_engine import SUFFIX_SIZES

    docs, cached, plain = prefix_chats(tiny_model, documents=30, max_tokens=8)
    cached.invoke([SystemMessage(docs), HumanMessage("What is a payload?")])
    engine = cached._engine_for(cached.model, cached.revision)
    long_question = "Explain every stage in turn, with its fuel and its engines. " * 20
    second = [SystemMessage(docs), HumanMessage(long_question)]
    before = engine.prefix_hit_tokens
    with suffix_steps(engine) as rests:
        answer = cached.invoke(second)
    reused = engine.prefix_hit_tokens - before
    assert reused > 0  # the system message was reused
    prompt_tokens = answer.usage_metadata["input_tokens"]
    assert prompt_tokens - reused > max(SUFFIX_SIZES)  # a rest no captured step holds
    assert rests == []  # so it went through the prefill passes
    assert answer.content == plain.invoke(second).content


def test_dense_prefill_is_a_marlin_option_and_reaches_the_model(tiny_model: str) -> None:
    """`dense_prefill` travels with the settings; only Marlin models keep the copy (none on
    the CPU, whose free memory is not measured)."""
    from langchain_synthia._fast_model import _dense_prefill_pays

    chat = ChatSynthia(model=tiny_model, device=DEVICE, engine="fast", dense_prefill=True)
    settings = chat._settings(chat.model, chat.revision)
    assert settings.dense_prefill is True
    assert (
        ChatSynthia(model=tiny_model, engine="transformers", dense_prefill=True)
        ._settings(tiny_model, "main")
        .dense_prefill
        is None
    )  # the transformers engine has no such copy
    model = FastMistral(Path(tiny_model), torch.device(DEVICE), max_batch=1, max_len=64,
                        dense_prefill=True)  # fmt: skip
    assert model.kernel == "triton"
    assert model.dense_prefill is False
    assert _dense_prefill_pays(Path(tiny_model), torch.device("cpu")) is False


def test_long_prompts_prefilled_in_pieces_give_the_same_logits(tiny_model: str) -> None:
    """A prompt cut across passes (attention over its own earlier pieces) equals one pass."""
    model = fast_model(tiny_model, max_batch=2)
    ids = prompt_ids(tiny_model, "Explain in detail how rockets reach orbit, stage by stage.")
    whole = model.prefill(0, ids)
    last = None
    for start in range(0, len(ids), 7):
        last = model.prefill(1, ids[start : start + 7], start)
    assert rel(last, whole) < LOGITS_REL
    assert int(last.argmax()) == int(whole.argmax())


def row_keys(model: FastMistral, row: int, count: int) -> torch.Tensor:
    """The keys of positions ``0 ... count - 1`` of decode row `row`, every layer."""
    positions = torch.arange(count, device=model.device)
    blocks = model.tables[row].long()[positions // model.block_size]
    return model.k_cache[:, blocks, positions % model.block_size]


def test_a_prompts_rest_as_one_decode_step_equals_its_prefill(tiny_model: str) -> None:
    """Tokens of one prompt as the rows of a decode step (all in one cache row, each attending
    up to its own position; padded with copies of the last) give the prefill's logits."""
    model = fast_model(tiny_model, max_batch=3)
    ids = prompt_ids(tiny_model, "Explain in detail how rockets reach orbit, stage by stage.")
    whole = model.prefill(2, ids)
    start = len(ids) - 9
    model.prefill(1, ids[:start])
    size, rest = 16, ids[start:]
    pad = size - len(rest)
    tokens = torch.tensor(rest + rest[-1:] * pad, device=DEVICE)
    positions = torch.tensor([*range(start, len(ids)), *[len(ids) - 1] * pad], device=DEVICE)
    rows = torch.full((size,), 1, device=DEVICE)
    logits = model.decode(size, tokens, positions, rows)
    assert rel(logits[len(rest) - 1], whole) < LOGITS_REL
    assert int(logits[len(rest) - 1].argmax()) == int(whole.argmax())
    # row 1's blocks now hold what a prefill of the whole prompt writes; row 0's are intact
    assert rel(row_keys(model, 1, len(ids)), row_keys(model, 2, len(ids))) < LOGITS_REL
    assert not row_keys(model, 0, model.max_len).any()
    # earlier tokens of the rest got their own positions' logits too
    assert rel(logits[0], model.prefill(2, ids[: start + 1])) < LOGITS_REL


def test_a_long_prompt_answers_as_in_one_pass(tiny_model: str, monkeypatch) -> None:
    question = "Explain in detail how rockets reach orbit, stage by stage, with numbers."
    chat = fast_chat(tiny_model, max_tokens=12, prefix_caching=False)
    whole = chat.invoke(question)
    engine = chat._engine_for(chat.model, chat.revision)
    monkeypatch.setattr(engine.scheduler, "max_prefill_tokens", 5)  # chunks of 5 tokens
    cut = chat.invoke(question)
    assert cut.content == whole.content
    assert cut.usage_metadata == whole.usage_metadata
