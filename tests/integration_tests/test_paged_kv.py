"""The fast engine's paged KV cache, seen from `ChatSynthia`: memory by the token.

Requests wait in the queue while the cache has no room for them and answer as they do alone;
a request that could never fit is refused at once; prefix hits change no answer (greedy or
seeded); a long request under a sliding window holds about a window of blocks.
"""

import os
import time
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_synthia import ChatSynthia
from langchain_synthia.testing import make_tiny_checkpoint
from tests.helpers import DEVICE

pytestmark = pytest.mark.gpu  # the GPU tier: SYNTHIA_TEST_DEVICE=cuda pytest -m gpu

WINDOW = 16


def chat_of(model: str, **options) -> ChatSynthia:
    settings = {"max_tokens": 24, "temperature": 0, "stop_at_user_turn": False, "timeout": 60,
                **options}  # fmt: skip
    return ChatSynthia(model=model, device=DEVICE, engine="fast", **settings)


def engine_of(chat: ChatSynthia):
    return chat._engine_for(chat.model, chat.revision)


def blocks_given_back(engine, seconds: float = 5.0) -> bool:
    """Whether every request's blocks are back in the pool (the scheduler thread frees a
    finished request's blocks just after its caller got the last token)."""
    deadline = time.monotonic() + seconds
    while engine.blocks.num_committed_blocks:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture(scope="module")
def window_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint with a 16-token sliding window (reused from $SYNTHIA_TINY_DIR)."""
    root = os.environ.get("SYNTHIA_TINY_DIR")
    folder = Path(root) if root else tmp_path_factory.mktemp("tiny")
    return str(make_tiny_checkpoint(folder / f"tiny-window{WINDOW}", sliding_window=WINDOW))


QUESTIONS = [
    "Why is the sky blue?",
    "Tell me about rockets and how they reach orbit.",
    "What is a glacier made of?",
    "Name three comets.",
]


def test_requests_wait_for_blocks_and_answer_as_alone(tiny_model: str) -> None:
    """A cache with room for about two requests: four sent at once all answer, some of them
    after waiting in the queue, and each answer is the one it gets alone."""
    small = chat_of(tiny_model, kv_cache_tokens=160, prefix_caching=False)
    engine = engine_of(small)
    assert engine.blocks.num_blocks * engine.blocks.block_size == 160
    alone = [small.invoke(q).content for q in QUESTIONS]
    waiting: list[int] = []
    step = engine._step
    engine._step = lambda: (waiting.append(engine.num_waiting), step())[1]
    try:
        together = [m.content for m in small.batch(QUESTIONS)]
    finally:
        del engine._step
    assert together == alone
    assert max(waiting) > 0  # some requests waited for memory while others decoded
    assert blocks_given_back(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_request_that_can_never_fit_is_refused_at_once_and_alone(tiny_model: str) -> None:
    small = chat_of(tiny_model, kv_cache_tokens=64, prefix_caching=False)
    with pytest.raises(ValueError, match="can never fit the KV cache") as caught:
        small.invoke("Tell me a long story about rockets.", max_tokens=200)
    message = str(caught.value)
    assert "gpu_memory_utilization" in message
    assert "kv_cache_tokens" in message
    assert "lower max_tokens" in message
    assert small.invoke("Hi", max_tokens=4).usage_metadata["output_tokens"] == 4


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.9, "seed": 7}], ids=["greedy", "seeded"]
)
def test_a_prefix_hit_changes_no_answer(tiny_model: str, sampling: dict) -> None:
    system = SystemMessage(" ".join(f"Rule {i}: answer briefly and kindly." for i in range(20)))
    cached, plain = chat_of(tiny_model), chat_of(tiny_model, prefix_caching=False)
    engine = engine_of(cached)
    for question in QUESTIONS[:2]:
        messages = [system, HumanMessage(question)]
        before = engine.prefix_hit_tokens
        first = cached.invoke(messages, **sampling)
        again = cached.invoke(messages, **sampling)  # its whole prompt but the last block cached
        assert engine.prefix_hit_tokens - before >= 100
        expected = plain.invoke(messages, **sampling)
        assert first.content == again.content == expected.content
        assert first.usage_metadata == again.usage_metadata == expected.usage_metadata
    assert engine_of(plain).prefix_hit_tokens == 0


def test_a_one_token_call_leaves_its_prompt_for_the_next(tiny_model: str) -> None:
    """A call that ends with its first token still leaves its prompt's blocks cached."""
    chat = chat_of(tiny_model)
    engine = engine_of(chat)
    system = SystemMessage(" ".join(f"Policy {i}: be brief and exact." for i in range(20)))
    chat.invoke([system, HumanMessage("First question?")], max_tokens=1)
    before = engine.prefix_hit_tokens
    chat.invoke([system, HumanMessage("Second question?")], max_tokens=4)
    assert engine.prefix_hit_tokens - before >= 100


def test_a_long_request_holds_about_one_window_of_blocks(window_model: str) -> None:
    """A 16-token window: while a request of ~250 positions decodes, it holds at most the
    blocks its window reads plus the one being written (a row would hold all 16)."""
    chat = chat_of(window_model, max_tokens=150, context_window=512, prefix_caching=False)
    engine = engine_of(chat)
    held: list[int] = []
    step = engine._step

    def spy() -> None:
        held.extend(s.num_held_blocks for s in engine._sequences if s is not None)
        step()

    engine._step = spy
    try:
        docs = " ".join(f"Document {i} is about rockets." for i in range(12))
        answer = chat.invoke([SystemMessage(docs), HumanMessage("Summarise the documents.")])
    finally:
        del engine._step
    positions = answer.usage_metadata["total_tokens"]
    assert positions > 10 * WINDOW  # many windows long
    size = engine.blocks.block_size
    assert max(held) <= WINDOW // size + 2, max(held)
    assert blocks_given_back(engine)


def test_a_prefill_that_runs_out_of_memory_goes_on_in_smaller_passes(tiny_model: str) -> None:
    """Memory beside the KV cache can be fragmented: a prefill pass that runs out of it runs
    again in smaller passes (fewer prompts, then parts of one prompt), and every request gets
    the answer it gets when memory suffices, instead of all of them failing."""
    import torch

    chat = chat_of(tiny_model, prefix_caching=False)
    engine = engine_of(chat)
    alone = [chat.invoke(q).content for q in QUESTIONS]
    prefill_many = engine.model.prefill_many
    passes: list[list[int]] = []

    def short_of_memory(prompts):  # any pass of more than 20 tokens fails
        passes.append([len(ids) for _, ids, _ in prompts])
        if sum(len(ids) for _, ids, _ in prompts) > 20:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return prefill_many(prompts)

    engine.model.prefill_many = short_of_memory
    try:
        together = [m.content for m in chat.batch(QUESTIONS)]
    finally:
        del engine.model.prefill_many
    assert together == alone
    assert engine.prefill_splits > 0
    assert max(sum(p) for p in passes) > 20  # the first passes were too large ...
    assert any(len(p) == 1 and p[0] <= 20 for p in passes)  # ... and parts of prompts ran
    assert blocks_given_back(engine)


def test_an_observer_sees_each_request_arrive_prefill_decode_and_end(tiny_model: str) -> None:
    """`FastEngine.observe`: the public profiling hook reports each event while watched, and
    nothing after the block ends."""
    from langchain_synthia.engine import EngineObserver

    chat = chat_of(tiny_model, max_tokens=6, prefix_caching=False)
    engine = engine_of(chat)

    class Recorder(EngineObserver):
        def __init__(self) -> None:
            self.arrived = self.steps = 0
            self.prefilled_tokens = 0
            self.prefills: list[tuple[float, int]] = []
            self.planned: list[tuple[int, int, int]] = []
            self.ended: list[tuple[list[int], list[int], int]] = []

        def requests_arrived(self, *, count: int) -> None:
            self.arrived += count

        def scheduled(self, *, decoding, waiting, blocks_in_use, prefill_tokens) -> None:
            self.planned.append((decoding, waiting, blocks_in_use))

        def prefilled(self, *, seconds: float, chunks: int, tokens: int) -> None:
            self.prefills.append((seconds, chunks))
            self.prefilled_tokens += tokens

        def step_launched(self, *, rows: int) -> None:
            self.steps += 1

        def finished(self, *, prompt_ids, generated, held_blocks) -> None:
            self.ended.append((prompt_ids, generated, held_blocks))

    with engine.observe(Recorder()) as seen:
        answers = chat.batch(QUESTIONS[:2])
        deadline = time.monotonic() + 5
        while len(seen.ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen.arrived == 2
    assert len(seen.ended) == 2
    prompts = sorted(len(p) for p, _, _ in seen.ended)
    assert seen.prefilled_tokens == sum(prompts)  # every prompt token computed once, no cache
    assert all(seconds >= 0 for seconds, _ in seen.prefills)
    assert all(chunks >= 1 for _, chunks in seen.prefills)
    for answer in answers:
        generated = answer.usage_metadata["output_tokens"]
        assert any(len(g) == generated for _, g, _ in seen.ended)
    assert all(held >= 1 for _, _, held in seen.ended)
    assert seen.steps >= 5  # six tokens each: the first from the prefill, then decode steps
    assert max(decoding for decoding, _, _ in seen.planned) == 2
    assert max(blocks for _, _, blocks in seen.planned) >= 2
    steps = seen.steps
    chat.invoke("Hi")
    assert seen.steps == steps  # no longer watched
