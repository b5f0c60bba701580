"""TokenStream: whole-answer readers get every event and are woken once, not per token."""

import asyncio
import queue
import threading
import time

import pytest

from langchain_synthia._requests import GenerationRequest, TokenEvent
from langchain_synthia._sampling import SamplingParams
from langchain_synthia._token_stream import (
    GenerationTimeoutError,
    TokenStream,
    aread_all,
    read_all,
)

GREEDY = SamplingParams(0.0, 1.0, 0, 1.0, 0)


def events(count: int) -> list[TokenEvent]:
    body = [TokenEvent(text=f"t{i} ", token_id=i) for i in range(count - 1)]
    return [*body, TokenEvent(text="end", token_id=99, finish_reason="stop", output_tokens=count)]


class CountingQueue(queue.SimpleQueue):
    """A queue that counts what is put on it (each put may wake the reader)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, item, block=True, timeout=None) -> None:
        self.puts += 1
        super().put(item, block, timeout)


def count_wakeups(into: list) -> None:
    """Record every wake-up of the running event loop from another thread (or from itself)."""
    loop = asyncio.get_running_loop()
    original = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        into.append(callback)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]


def produce(stream: TokenStream, items: list, delay: float = 0.0) -> threading.Thread:
    def run() -> None:
        for item in items:
            time.sleep(delay)
            stream.put(item)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_collect_returns_every_event_and_wakes_the_reader_once() -> None:
    stream = TokenStream(GenerationRequest("p", 50, GREEDY), input_tokens=3)
    stream._items = CountingQueue()
    sent = events(50)
    stream.put(sent[0])  # one event before the reader asks for the whole answer
    thread = produce(stream, sent[1:], delay=0.0005)
    assert read_all(stream) == sent
    thread.join()
    assert stream._items.puts == 2  # the early event, then one end-of-hold marker
    assert stream.cancelled.is_set()  # the request is done with, as after iterating


def test_iterating_still_gets_each_event_as_it_comes() -> None:
    stream = TokenStream(GenerationRequest("p", 10, GREEDY), input_tokens=3)
    stream._items = CountingQueue()
    sent = events(10)
    thread = produce(stream, sent)
    assert list(stream) == sent
    thread.join()
    assert stream._items.puts == 10


@pytest.mark.parametrize("end", [None, RuntimeError("device lost")])
def test_collect_ends_on_an_end_marker_or_an_error(end) -> None:
    stream = TokenStream(GenerationRequest("p", 10, GREEDY), input_tokens=3)
    thread = produce(stream, [*events(4)[:3], end])
    if end is None:
        assert [e.text for e in read_all(stream)] == ["t0 ", "t1 ", "t2 "]
    else:
        with pytest.raises(RuntimeError, match="device lost"):
            read_all(stream)
    thread.join()


def test_collect_still_times_out() -> None:
    stream = TokenStream(GenerationRequest("p", 10, GREEDY, timeout=0.05), input_tokens=3)
    stream.put(events(3)[0])
    with pytest.raises(GenerationTimeoutError):
        stream.collect()
    assert stream.cancelled.is_set()


def test_acollect_returns_every_event_and_wakes_the_loop_once() -> None:
    stream = TokenStream(GenerationRequest("p", 40, GREEDY), input_tokens=3)
    sent = events(40)
    wakeups = []

    async def read() -> list[TokenEvent]:
        count_wakeups(wakeups)
        task = asyncio.ensure_future(aread_all(stream))
        await asyncio.sleep(0.01)  # the reader is waiting before the tokens come
        thread = produce(stream, sent, delay=0.0005)
        got = await task
        thread.join()
        return got

    assert asyncio.run(read()) == sent
    assert len(wakeups) == 1


def test_read_all_takes_any_iterable_of_events() -> None:
    sent = events(3)
    assert read_all(iter(sent)) == sent

    async def agen():
        for event in sent:
            yield event

    assert asyncio.run(aread_all(agen())) == sent


def test_async_streams_of_one_loop_share_its_wakeups_and_keep_their_order() -> None:
    """A step hands 16 async streams a token each: the loop is woken once, not 16 times."""
    streams = [TokenStream(GenerationRequest("p", 4, GREEDY), input_tokens=3) for _ in range(16)]
    wakeups = []

    async def read() -> list[list[str]]:
        count_wakeups(wakeups)
        readers = [stream.__aiter__() for stream in streams]
        firsts = [asyncio.ensure_future(anext(reader)) for reader in readers]
        await asyncio.sleep(0)  # every reader is now waiting on its queue
        for step in range(3):  # three steps, each handing every stream its token at once
            for index, stream in enumerate(streams):
                finish = "length" if step == 2 else None
                stream.put(TokenEvent(text=f"{index}.{step}", token_id=step, finish_reason=finish))
        got = [[(await first).text] for first in firsts]
        for index, reader in enumerate(readers):
            got[index] += [event.text async for event in reader]
        return got

    got = asyncio.run(read())
    assert got == [[f"{i}.0", f"{i}.1", f"{i}.2"] for i in range(16)]
    assert len(wakeups) == 1  # all 48 puts came before the loop ran: one wake-up
