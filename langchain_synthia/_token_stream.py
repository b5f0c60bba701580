"""`TokenStream`: the events of one request, handed from the engine's thread to its reader.

An engine `put`s each `TokenEvent` of a request into its stream from the thread that decodes
it; the caller reads the stream synchronously or with ``async for``, or reads it whole
(`read_all`, `aread_all`), which wakes the reader once instead of once per token.
"""

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from langchain_synthia._requests import GenerationRequest, TokenEvent, deadline_of


class _Mailbox:
    """Hands items to queues of one event loop, waking it once for all that arrive together.

    The scheduler hands out a token to every row of a step in one go; with 16 async streams on
    one loop, that is one wake-up of the loop per step instead of 16.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, target: asyncio.Queue, item: Any) -> None:
        """Put `item` on `target` from any thread (raises RuntimeError if the loop is closed)."""
        with self._lock:
            self._items.append((target, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for target, item in items:
            target.put_nowait(item)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = (
    weakref.WeakKeyDictionary()
)
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


_HELD = object()
"""Put on a collecting reader's queue when its request ends: take the held events."""


def _ends(item: Any) -> bool:
    """Whether `item` is the last a stream gets (the end, an error, or a finished event)."""
    return item is None or isinstance(item, BaseException) or item.finish_reason is not None


def read_all(stream: Iterable[TokenEvent]) -> list[TokenEvent]:
    """All of a stream's events; a `TokenStream` wakes the reader once, at the end."""
    return stream.collect() if isinstance(stream, TokenStream) else list(stream)


async def aread_all(stream: AsyncIterable[TokenEvent]) -> list[TokenEvent]:
    """`read_all` for async callers."""
    if isinstance(stream, TokenStream):
        return await stream.acollect()
    return [event async for event in stream]


class GenerationTimeoutError(TimeoutError):
    """A generation ran past its ``timeout``."""


class EngineStoppedError(RuntimeError):
    """The engine stopped without finishing a request.

    Its decoding thread ended, or its model was unloaded (`engine_closed_error`).
    """


def engine_closed_error() -> EngineStoppedError:
    """The error of a request still open when its engine closes (``unload()``, or exit)."""
    return EngineStoppedError(
        "The model was unloaded (unload()) before this request finished. Send the request "
        "again: the next call loads the model again."
    )


PRODUCER_CHECK = 1.0
"""Seconds between a waiting reader's checks that its request's decoding thread still runs."""


class TokenStream:
    """The events of one request, readable once, synchronously or asynchronously.

    Stopping early (``break``, closing the generator, cancelling the task) cancels the request:
    the engine drops its row at the next step.
    """

    def __init__(self, request: GenerationRequest, input_tokens: int) -> None:
        """Create the stream of `request`; `submit` does this."""
        self.request = request
        self.input_tokens = input_tokens
        self.cancelled = threading.Event()
        self._items: queue.SimpleQueue[TokenEvent | BaseException | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_items: asyncio.Queue[TokenEvent | BaseException | None] | None = None
        self._lock = threading.Lock()
        self._deadline = deadline_of(request)
        self._held: list[TokenEvent | BaseException | None] | None = None
        """While a reader `collect`s: the events, handed over only once the request ends."""
        self.producer: threading.Thread | None = None
        """The thread that decodes the request (the engine sets it): a reader that waits in
        vain checks that it still runs, and fails with `EngineStoppedError` once it does not."""
        self._producer_gone = False

    def cancel(self) -> None:
        """Stop generating for this request."""
        self.cancelled.set()

    def put(self, item: TokenEvent | BaseException | None) -> None:
        """Hand the reader `item` (the engine does this, from the thread that decodes).

        `item` is the next event, the error that ends the request, or ``None`` for an end
        without a last event (a cancelled request).
        """
        with self._lock:
            if self._held is not None:  # a collecting reader: wake it once, at the end
                self._held.append(item)
                if not _ends(item):
                    return
                item = _HELD
            if self._loop is None:
                self._items.put(item)
                return
            try:
                _mailbox(self._loop).post(self._async_items, item)  # type: ignore[arg-type]
            except RuntimeError:  # the consumer's event loop is gone
                self.cancel()

    def collect(self) -> list[TokenEvent]:
        """Every event of the request, once it ends (for callers that want the whole answer).

        The reader is woken once instead of once per token: with 32 requests of a batch read
        this way, 32 threads no longer take turns at every step.
        """
        with self._lock:
            self._held = []
        return list(self)

    async def acollect(self) -> list[TokenEvent]:
        """`collect` for async callers: the event loop is woken once, at the end."""
        with self._lock:
            self._held = []
        return [event async for event in self]

    def _take(self, item: Any) -> tuple[list[TokenEvent], bool | BaseException]:
        """The events one queued item delivers, and how the stream goes on after them.

        The end-of-hold marker delivers every held event. The second value is ``False`` to go
        on, ``True`` when the stream has ended, or the error to raise after the events.
        """
        if item is _HELD:
            with self._lock:
                items, self._held = self._held or [], []
        else:
            items = [item]
        events: list[TokenEvent] = []
        for event in items:
            if isinstance(event, TokenEvent):
                events.append(event)
            if _ends(event):
                return events, event if isinstance(event, BaseException) else True
        return events, False

    def __iter__(self) -> Iterator[TokenEvent]:
        """Yield the events as the engine produces them."""
        try:
            while True:
                try:
                    item = self._items.get(timeout=self._wait())
                except queue.Empty:
                    self._check_waiting()
                    continue
                events, end = self._take(item)
                yield from events
                if isinstance(end, BaseException):
                    raise end
                if end:
                    return
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        """Yield the events without blocking the event loop."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_items = asyncio.Queue()
            while not self._items.empty():  # events that arrived before the first read
                self._async_items.put_nowait(self._items.get_nowait())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self._async_items.get(), self._wait())
                except asyncio.TimeoutError:
                    self._check_waiting()
                    continue
                events, end = self._take(item)
                for event in events:
                    yield event
                if isinstance(end, BaseException):
                    raise end
                if end:
                    return
        finally:
            self.cancel()

    def _wait(self) -> float | None:
        """Seconds to wait for the next item before checking the deadline and the producer."""
        wait = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        if self.producer is not None:
            wait = PRODUCER_CHECK if wait is None else min(wait, PRODUCER_CHECK)
        return None if wait is None else min(wait, threading.TIMEOUT_MAX)

    def _check_waiting(self) -> None:
        """After a wait that got nothing: raise if the time is up or the producer is gone.

        A producer found stopped gets one more wait, for items it queued just before.
        """
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise self._timeout_error()
        if self.producer is not None and not self.producer.is_alive():
            if self._producer_gone:
                self.cancel()
                msg = (
                    f"The engine's decoding thread ({self.producer.name}) stopped without "
                    "finishing this request; see the log for its error. Send the request again."
                )
                raise EngineStoppedError(msg)
            self._producer_gone = True

    def _timeout_error(self) -> GenerationTimeoutError:
        self.cancel()
        msg = (
            f"Generation took longer than timeout={self.request.timeout}s and was stopped. "
            "Raise `timeout`, lower `max_tokens`, or pass timeout=None."
        )
        return GenerationTimeoutError(msg)
