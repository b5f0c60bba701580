"""ChatSynthia on the tiny checkpoint: behaviour beyond the standard suite."""

import time

import pytest
from langchain_core.messages import HumanMessage

from langchain_synthia import (
    ChatSynthia,
    GenerationTimeoutError,
    SynthiaOutputParser,
    render_messages,
    synthia_chat_prompt,
)
from langchain_synthia._loading import ModelSettings, get_engine
from langchain_synthia._transformers_engine import TransformersEngine
from tests.helpers import DEVICE, LoopTicker, TokenCounter


@pytest.fixture
def chat(tiny_model: str) -> ChatSynthia:
    return ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=20, temperature=0)


def engine_of(tiny_model: str) -> TransformersEngine:
    return get_engine(ModelSettings(model=tiny_model, device=DEVICE))


def greedy_reference(
    tiny_model: str, prompt: str, new_tokens: int, penalty: float = 1.1
) -> list[int]:
    """transformers' own generate() on the same loaded model: the reference path."""
    import torch

    engine = engine_of(tiny_model)
    ids = torch.tensor([engine.encode(prompt)], device=engine.device)
    out = engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        repetition_penalty=penalty,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def test_quick_start_chain_streams_token_by_token(tiny_model: str) -> None:
    counter = TokenCounter()
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=30, callbacks=[counter])
    chain = synthia_chat_prompt(tree_of_thought=True) | chat | SynthiaOutputParser()
    pieces = list(chain.stream({"question": "How is a rocket launched to Low Earth Orbit?"}))
    assert len(pieces) > 1
    text = "".join(pieces)
    assert text == text.strip()
    assert "USER:" not in text
    assert 1 < len(counter.tokens) <= 30


def test_every_generated_token_fires_one_callback_in_invoke_and_stream(chat: ChatSynthia) -> None:
    for streaming in (False, True):
        counter = TokenCounter()
        if streaming:
            chunks = list(chat.stream("Hello", config={"callbacks": [counter]}))
            assert sum(1 for c in chunks if c.usage_metadata) == 1
            assert chunks[-1].chunk_position == "last"
            usage, text = chunks[-1].usage_metadata, "".join(c.content for c in chunks)
        else:
            message = chat.invoke("Hello", config={"callbacks": [counter]})
            usage, text = message.usage_metadata, message.content
        assert usage is not None
        assert len(counter.tokens) == usage["output_tokens"] == 20
        assert "".join(counter.tokens) == text


def test_invoke_and_stream_agree_and_report_usage(chat: ChatSynthia, tiny_model: str) -> None:
    message = chat.invoke("Tell me about AI")
    streamed = list(chat.stream("Tell me about AI"))
    assert "".join(c.content for c in streamed) == message.content
    prompt_tokens = len(
        engine_of(tiny_model).encode(render_messages([HumanMessage("Tell me about AI")]))
    )
    assert message.usage_metadata == {
        "input_tokens": prompt_tokens,
        "output_tokens": 20,
        "total_tokens": prompt_tokens + 20,
    }
    assert message.response_metadata["finish_reason"] == "length"
    assert message.response_metadata["model_name"] == tiny_model
    assert message.response_metadata["model_provider"] == "synthia"


def test_greedy_tokens_equal_transformers_generate(tiny_model: str) -> None:
    engine = engine_of(tiny_model)
    prompt = render_messages([HumanMessage("How is a rocket launched?")])
    for penalty in (1.0, 1.1):
        reference = greedy_reference(tiny_model, prompt, 32, penalty)
        chat = ChatSynthia(
            model=tiny_model,
            device=DEVICE,
            max_tokens=32,
            temperature=0,
            repetition_penalty=penalty,
            stop_at_user_turn=False,
        )
        chunks = list(chat._stream([HumanMessage("How is a rocket launched?")]))
        assert len(chunks) == 32
        text = "".join(c.message.content for c in chunks)
        assert text == engine.tokenizer.decode(reference, skip_special_tokens=True)


def test_multi_token_stop_is_honoured_and_not_returned(chat: ChatSynthia, tiny_model: str) -> None:
    full = chat.invoke("Hello there", max_tokens=40).content
    words = full.split()
    assert len(words) > 4
    stop = " ".join(words[2:4])  # a stop that spans several tokens, mid-answer
    for message in (chat.invoke("Hello there", stop=[stop], max_tokens=40),):
        assert message.content == full[: full.index(stop)]
        assert message.response_metadata["finish_reason"] == "stop"
        assert message.usage_metadata["output_tokens"] < 40
    streamed = "".join(c.content for c in chat.stream("Hello there", stop=[stop], max_tokens=40))
    assert streamed == full[: full.index(stop)]
    fresh = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=40, temperature=0, stop=[stop])
    assert fresh.invoke("Hello there").content == full[: full.index(stop)]


def test_per_call_overrides_and_seed_reproducibility(tiny_model: str) -> None:
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=12, temperature=1.0, seed=7)
    a, b = chat.invoke("Hi").content, chat.invoke("Hi").content
    assert a == b
    assert chat.invoke("Hi", seed=8).content != a or chat.invoke("Hi", seed=9).content != a
    assert chat.invoke("Hi", max_tokens=3).usage_metadata["output_tokens"] == 3
    with pytest.raises(TypeError, match="Unknown option 'maxtokens'"):
        chat.invoke("Hi", maxtokens=3)


def test_batch_is_one_padded_gpu_batch(chat: ChatSynthia, tiny_model: str, batches) -> None:
    engine = engine_of(tiny_model)
    prompts = ["Hi", "Hello there, how are you today?", "Why?", "Tell me about AI", "x"]
    results = chat.batch(prompts)
    assert batches == [5]
    assert [r.usage_metadata["output_tokens"] for r in results] == [20] * 5
    inputs = [r.usage_metadata["input_tokens"] for r in results]
    assert inputs == [len(engine.encode(render_messages([HumanMessage(p)]))) for p in prompts]
    batches.clear()
    chat.batch(prompts, config={"max_concurrency": 2})
    assert sorted(batches, reverse=True) == [2, 2, 1]
    assert engine is engine_of(tiny_model)


async def test_abatch_is_one_padded_batch(chat: ChatSynthia, batches) -> None:
    results = await chat.abatch(["a", "b", "c"])
    assert batches == [3]
    assert len(results) == 3


async def test_async_never_blocks_the_event_loop(chat: ChatSynthia) -> None:
    await chat.ainvoke("warm up")
    async with LoopTicker() as loop:
        chunks = [c async for c in chat.astream("Tell me a long story", max_tokens=40)]
        message = await chat.ainvoke("Another one", max_tokens=40)
    assert len(chunks) >= 40
    assert message.usage_metadata["output_tokens"] == 40
    assert loop.ticks > 20


def test_concurrent_streams_from_threads_stay_separate(chat: ChatSynthia) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["one", "two two", "three three three", "four"]
    alone = {p: chat.invoke(p).content for p in prompts}
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: "".join(c.content for c in chat.stream(p)), prompts))
    assert together == [alone[p] for p in prompts]


def test_prompt_longer_than_the_context_window_is_refused(tiny_model: str) -> None:
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=5)
    with pytest.raises(
        ValueError, match=r"The prompt is \d+ tokens but Synthia's context window is 4096"
    ):
        chat.invoke("word " * 5000)


def test_answer_is_capped_by_the_context_window(tiny_model: str) -> None:
    chat = ChatSynthia(
        model=tiny_model, device=DEVICE, max_tokens=50, context_window=64, temperature=0
    )
    message = chat.invoke("Hi")
    usage = message.usage_metadata
    assert usage["total_tokens"] == 64
    assert message.response_metadata["finish_reason"] == "length"


def test_empty_message_list_is_a_clear_error(chat: ChatSynthia) -> None:
    with pytest.raises(ValueError, match="empty message list"):
        chat.invoke([])


def test_timeout_raises_and_the_next_call_is_fine(tiny_model: str) -> None:
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=4000, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(GenerationTimeoutError, match=r"timeout=0\.2s"):
        chat.invoke("Never ending")
    assert time.monotonic() - started < 5
    assert chat.invoke("Short", max_tokens=3, timeout=None).usage_metadata["output_tokens"] == 3


def test_stopping_a_stream_early_cancels_its_work(chat: ChatSynthia, monkeypatch) -> None:
    import threading

    for chunk in chat.stream("Go on and on", max_tokens=4000):
        if chunk.content:
            break
    deadline = time.monotonic() + 5
    while any(t.name == "synthia-decode" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the decode thread kept running after the consumer left"
        time.sleep(0.01)


def test_instances_with_equal_settings_share_one_model(tiny_model: str) -> None:
    a = ChatSynthia(model=tiny_model, device=DEVICE, temperature=0.1).load()
    b = ChatSynthia(model=tiny_model, device=DEVICE, temperature=0.9)
    assert a._engine_for(a.model, a.revision) is b._engine_for(b.model, b.revision)
