"""Batching of concurrent calls: the requests of one ``.batch()`` become one engine batch.

LangChain runs a ``.batch()`` as concurrent calls; inside `batch_group`, `open_stream` holds
each local engine's requests until the batch has arrived and starts them together
(`BatchGroup`). Outside a group, and for engines that batch on their own side (a remote
server), `open_stream` starts the request at once.
"""

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterable, Iterable, Iterator
from typing import cast

from langchain_synthia._engine_interface import Engine
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._requests import GenerationRequest, TokenEvent, deadline_of
from langchain_synthia._token_stream import EngineStoppedError, GenerationTimeoutError, TokenStream

GATHER_WINDOW = 0.2
"""Seconds a `BatchGroup` waits for the next request before it starts the ones it has.

Long enough for LangChain's worker threads to reach the engine on a loaded 2-core machine
(at 0.05 s one of three inputs of a ``.batch()`` sometimes started alone there); it is what
the rest of a batch waits when one input fails before it reaches the engine."""


class BatchGroup:
    """Gathers the requests of one ``.batch()`` call into one padded engine batch.

    LangChain runs a chat model's ``batch`` as concurrent ``invoke`` calls. While a group is
    active (see `batch_group`), `join` holds each request until the expected number
    have arrived (or ``window`` seconds pass without a new one, e.g. when an input failed before
    reaching the engine), then submits them together, one batch per engine.
    """

    def __init__(self, expected: int, window: float = GATHER_WINDOW) -> None:
        """Expect `expected` requests at once (a batch's size, or its ``max_concurrency``)."""
        self._expected = expected
        self._window = window
        self._pending: list[tuple[LocalEngine, GenerationRequest, _Slot]] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def join(self, engine: LocalEngine, request: GenerationRequest) -> "_Slot":
        """Add `request` to the group; its stream appears in the returned slot once started."""
        slot = _Slot(request)
        with self._lock:
            self._pending.append((engine, request, slot))
            if self._timer is not None:
                self._timer.cancel()
            if len(self._pending) >= self._expected:
                batch, self._pending, self._timer = self._pending, [], None
            else:
                batch = []
                self._timer = threading.Timer(self._window, self._launch_pending)
                self._timer.daemon = True
                self._timer.start()
        _launch(batch)
        return slot

    def _launch_pending(self) -> None:
        with self._lock:
            batch, self._pending, self._timer = self._pending, [], None
        _launch(batch)


class _Slot:
    """Where a grouped request's stream (or its submission error) appears once launched.

    A reader waits at most the request's ``timeout``; a stream that arrives after its reader
    gave up is cancelled.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self._request = request
        self._deadline = deadline_of(request)
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._stream: TokenStream | None = None
        self._error: BaseException | None = None

    @property
    def filled(self) -> bool:
        """Whether the stream (or the error) is there."""
        return self._ready.is_set()

    def fill(self, stream: TokenStream | None, error: BaseException | None) -> None:
        """Hand the reader its request's `stream`, or the `error` that kept it from starting."""
        with self._lock:
            self._stream, self._error = stream, error
            self._ready.set()
            abandoned = self._abandoned
        if abandoned and stream is not None:
            stream.cancel()

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return min(max(0.0, self._deadline - time.monotonic()), threading.TIMEOUT_MAX)

    def _result(self) -> TokenStream:
        with self._lock:
            if not self._ready.is_set():
                self._abandoned = True
                msg = (
                    f"The batch did not start within timeout={self._request.timeout}s. Raise "
                    "`timeout`, or pass timeout=None."
                )
                raise GenerationTimeoutError(msg)
        if self._error is not None:
            raise self._error
        assert self._stream is not None
        return self._stream

    def wait(self) -> TokenStream:
        """The stream, once the batch has started (raises its error, or on timeout)."""
        self._ready.wait(self._remaining())
        return self._result()

    async def await_stream(self) -> TokenStream:
        """`wait` for async callers: the event loop goes on meanwhile."""
        while not self._ready.is_set():
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                break
            await asyncio.sleep(0.001)
        return self._result()


def _launch(batch: list[tuple[LocalEngine, GenerationRequest, _Slot]]) -> None:
    """Start one padded batch per engine; a request that fails to start fails alone.

    Every slot is filled, whatever goes wrong: with its stream, or with the error that kept
    its request (or its engine's batch) from starting.
    """
    by_engine: dict[int, list[tuple[LocalEngine, GenerationRequest, _Slot]]] = {}
    for entry in batch:
        by_engine.setdefault(id(entry[0]), []).append(entry)
    try:
        for entries in by_engine.values():
            engine = entries[0][0]
            rows, slots = [], []
            for _, request, slot in entries:
                try:
                    rows.append(engine.row_for(request))
                    slots.append(slot)
                except Exception as error:
                    slot.fill(None, error)
            if not rows:
                continue
            try:
                engine.start(rows)
            except Exception as error:
                for slot in slots:
                    slot.fill(None, error)
                continue
            for row, slot in zip(rows, slots, strict=True):
                slot.fill(row.stream, None)
    finally:
        unfilled = [slot for _, _, slot in batch if not slot.filled]
        for slot in unfilled:  # an error past the ones above (KeyboardInterrupt, say)
            slot.fill(None, EngineStoppedError("The batch could not be started."))


_ACTIVE_GROUP: contextvars.ContextVar[BatchGroup | None] = contextvars.ContextVar(
    "synthia_batch_group", default=None
)


@contextlib.contextmanager
def batch_group(expected: int) -> Iterator[BatchGroup]:
    """Make the requests opened in this context (and in its threads and tasks) one batch."""
    group = BatchGroup(expected)
    token = _ACTIVE_GROUP.set(group)
    try:
        yield group
    finally:
        _ACTIVE_GROUP.reset(token)


def open_stream(engine: Engine, request: GenerationRequest) -> Iterable[TokenEvent]:
    """Start one request (through the active batch group, if any) and return its stream.

    An engine that does not batch locally (`langchain_synthia._remote.RemoteEngine`, whose
    server batches concurrent requests itself) starts every request at once.
    """
    group = _ACTIVE_GROUP.get()
    if group is None or not engine.batches_locally:
        return engine.open(request)
    return group.join(cast(LocalEngine, engine), request).wait()


async def aopen_stream(engine: Engine, request: GenerationRequest) -> AsyncIterable[TokenEvent]:
    """`open_stream` for async callers: waiting for the batch never blocks the event loop."""
    group = _ACTIVE_GROUP.get()
    if group is None or not engine.batches_locally:
        return engine.aopen(request)
    return await group.join(cast(LocalEngine, engine), request).await_stream()
