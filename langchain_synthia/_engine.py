"""Tokens in, token events out: the one generation path under every LangChain call.

Engines know nothing of LangChain. `BaseEngine.submit` takes `GenerationRequest`s and returns
their `TokenStream`s at once; the engine decodes them and pushes one `TokenEvent` per generated
token into each stream, which a caller reads synchronously or with ``async for``. Each row is
detokenized incrementally and cut at the first stop string to complete, without ever emitting
part of one (`_Row`).

Two engines share this: `Engine` here (transformers' model on any device; one worker thread per
padded batch) and `langchain_synthia._fast_engine.FastEngine` (CUDA graphs, continuous batching).
"""

import asyncio
import atexit
import contextlib
import contextvars
import inspect
import math
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from langchain_synthia._grammar import Constraint, allowed_tokens, bitmask_words
from langchain_synthia._sampling import GREEDY, BatchSampler, SamplingParams
from langchain_synthia._stops import StopMatcher

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete, with everything that decides how."""

    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    timeout: float | None = None
    """Seconds the whole generation may take; ``None`` waits as long as it runs."""
    context_window: int = 4096
    """Prompt plus answer may not exceed this many tokens (the prompt alone must fit)."""
    grammar: str | None = None
    """An llguidance grammar the answer must follow (`langchain_synthia._grammar`): each token
    is sampled among those the grammar allows, and the answer ends when it is complete."""
    constrained_opening: str | None = None
    """With a grammar that allows free text or a constrained part (``tool_choice="auto"``),
    the text that opens the constrained part (``"<tool_call>"``): an answer that begins with
    it, after any whitespace, is never cut by `stops`, which cut only the other answers."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it makes final.

    ``text`` may be empty: text that could still become a stop string, or an incomplete UTF-8
    character, is held back and arrives with a later token. The last event of a stream carries
    the ``finish_reason`` and the token counts.
    """

    text: str
    token_id: int
    finish_reason: FinishReason | None = None
    input_tokens: int = 0
    output_tokens: int = 0


def whole_answer(events: Sequence[TokenEvent]) -> TokenEvent:
    """A finished stream's events as one: all the text, the last event's finish and usage.

    Calls that do not stream (``invoke`` with no token callbacks, ``batch``) read their answer
    this way: nothing is built per token on the caller's side, which is what keeps a batch of
    32 from being bound by Python work in 32 threads.
    """
    return replace(events[-1], text="".join(event.text for event in events))


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


def deadline_of(request: GenerationRequest) -> float | None:
    """The `time.monotonic` time by which `request` must end (``None``: no limit, or inf)."""
    timeout = request.timeout
    if timeout is None or math.isinf(timeout):
        return None
    return time.monotonic() + timeout


class GenerationTimeoutError(TimeoutError):
    """A generation ran past its ``timeout``."""


class EngineStoppedError(RuntimeError):
    """The thread that decoded a request stopped without finishing it."""


PRODUCER_CHECK = 1.0
"""Seconds between a waiting reader's checks that its request's decoding thread still runs."""


class TokenStream:
    """The events of one request, readable once, synchronously or asynchronously.

    Stopping early (``break``, closing the generator, cancelling the task) cancels the request:
    the worker drops its row at the next step.
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

    # called from the worker thread
    def _put(self, item: TokenEvent | BaseException | None) -> None:
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
        """Yield the events as the worker produces them."""
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


class _Detokenizer:
    """Turns token ids into text one token at a time (SentencePiece spaces and UTF-8 intact)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = (  # the Rust tokenizer itself: the same text, a third of the time
            backend if not getattr(tokenizer, "clean_up_tokenization_spaces", True) else None
        )
        self._ids: list[int] = []
        self._prefix = 0  # decoding starts here, so the first token's space is handled alike
        self._read = 0  # text up to here has been returned

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class _Row:
    """The decoding state of one request inside a batch."""

    def __init__(
        self, stream: TokenStream, prompt_ids: list[int], budget: int, tokenizer: Any
    ) -> None:
        self.stream = stream
        self.prompt_ids = prompt_ids
        self.budget = budget
        self.generated = 0
        self.done = False
        self.detokenizer = _Detokenizer(tokenizer)
        self.stops = StopMatcher(stream.request.stops, stream.request.constrained_opening)
        grammar = stream.request.grammar
        self.constraint = None if grammar is None else Constraint(grammar, tokenizer)

    def advance(self, token_id: int, eos_id: int | None) -> None:
        """Account for one new token and send its event."""
        self.generated += 1
        if self.constraint is not None and token_id != eos_id:
            self.constraint.advance(token_id)
        text = self.stops.feed(self.detokenizer.push(token_id))
        finish: FinishReason | None = None
        ended = self.stops.stopped or token_id == eos_id
        if ended or (self.constraint is not None and self.constraint.complete):
            finish = "stop"
        elif self.generated >= self.budget:
            finish = "length"
        if finish is not None and not self.stops.stopped:  # no token follows (EOS, budget,
            # grammar): the text held back as a possible start of a stop is text after all
            text += self.stops.feed(self.detokenizer.flush()) + self.stops.flush()
        if finish is None:
            self.stream._put(TokenEvent(text, token_id))
            return
        self.done = True
        self.stream._put(
            TokenEvent(text, token_id, finish, self.stream.input_tokens, self.generated)
        )


class BaseEngine:
    """What every engine shares: tokenizing, validating and streaming requests.

    Subclasses decide how rows are decoded (`_start`). Thread-safe: requests may be submitted
    from any thread.
    """

    kind = "base"
    batches_locally = True
    """Requests opened inside a ``.batch()`` call join one engine batch (`BatchGroup`)."""

    def __init__(self, tokenizer: Any, *, name: str, device: Any, max_len: int) -> None:
        """Serve `tokenizer`'s model under `name` on `device`, prompts + answers <= `max_len`."""
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.max_len = max_len
        self._eos_id = tokenizer.eos_token_id
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the one BOS token the model expects.

        Raises:
            ValueError: If `text` is not text that UTF-8 can encode (a lone surrogate).
        """
        if not isinstance(text, str):
            msg = f"A prompt must be a str, not {type(text).__name__}."
            raise TypeError(msg)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            msg = (
                f"The prompt holds {text[error.start]!r} at character {error.start}, a lone "
                "surrogate, which is not text and cannot be tokenized: remove it, or decode "
                "the input's bytes with errors='replace' (not 'surrogateescape')."
            )
            raise ValueError(msg) from None
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def submit(self, requests: Sequence[GenerationRequest]) -> list[TokenStream]:
        """Start generating for `requests` as one padded batch; return their streams at once.

        Raises:
            ValueError: If a prompt does not fit the context window (nothing is truncated)
                or is not text.
        """
        rows = [self._row(request) for request in requests]
        self._start(rows)
        return [row.stream for row in rows]

    def _start(self, rows: list["_Row"]) -> None:
        raise NotImplementedError

    def _row(self, request: GenerationRequest) -> _Row:
        ids = self.encode(request.prompt)
        window = min(request.context_window, self.max_len)
        room = window - len(ids)
        if room <= 0:
            msg = (
                f"The prompt is {len(ids)} tokens but Synthia's context window is "
                f"{window} tokens. Shorten the prompt or the conversation history "
                "(nothing is truncated for you)."
            )
            raise ValueError(msg)
        budget = min(request.max_new_tokens, room)
        return _Row(TokenStream(request, len(ids)), ids, budget, self.tokenizer)


class Engine(BaseEngine):
    """transformers' own model (any device, any gptqmodel kernel) and a padded decode loop.

    Each submitted batch decodes in a worker thread of its own; model forwards are serialised.
    """

    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, name: str, max_len: int = 1 << 30) -> None:
        """Wrap a loaded causal LM; `langchain_synthia._loading.get_engine` builds engines."""
        super().__init__(tokenizer, name=name, device=model.device, max_len=max_len)
        self.model = model
        self._forward_lock = threading.Lock()
        # transformers renamed `past_key_values` to `cache` during 5.x; speak whichever it knows
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"

    def _start(self, rows: list["_Row"]) -> None:
        worker = threading.Thread(
            target=self._run, args=(rows,), name="synthia-decode", daemon=True
        )
        for row in rows:
            row.stream.producer = worker
        with _workers_lock:
            _workers[worker] = rows
        worker.start()

    def _run(self, rows: list[_Row]) -> None:
        try:
            self._decode(rows)
        except BaseException as error:
            for row in rows:
                fail_row(row, error)
        finally:
            for row in rows:
                if not row.done:  # cancelled
                    row.stream._put(None)
            with _workers_lock:
                _workers.pop(threading.current_thread(), None)

    def _decode(self, rows: list[_Row]) -> None:
        import torch

        sampler = BatchSampler(
            [GREEDY] * len(rows), [()] * len(rows), self.model.config.vocab_size, self.device
        )
        for index, row in enumerate(rows):
            try:
                sampler.assign(index, row.stream.request.sampling, row.prompt_ids)
            except Exception as error:  # this request's settings: it fails alone
                fail_row(row, error)
        ids, mask = self._left_padded([row.prompt_ids for row in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        while True:
            live = [not (row.done or row.stream.cancelled.is_set()) for row in rows]
            if not any(live):
                return
            with self._forward_lock, torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_arg: cache},
                )
                cache = out[self._cache_arg]
                logits = out["logits"][:, -1, :]
                allowed = grammar_mask(rows, logits.shape[-1], self.device)
                tokens = sampler.sample(logits, allowed=allowed)
            for row, token, alive in zip(rows, tokens.tolist(), live, strict=True):
                if alive and not row.done:  # a row whose grammar failed has ended
                    advance_or_fail(row, token, self._eos_id)
            ids = tokens[:, None]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1

    def _left_padded(self, prompts: list[list[int]]) -> "tuple[torch.Tensor, torch.Tensor]":
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)


def grammar_mask(
    rows: Sequence["_Row | None"], vocab_size: int, device: Any
) -> "torch.Tensor | None":
    """Tokens each row may take next under its grammar (``None`` when no row has one).

    A row whose grammar fails ends with that error (`fail_row`); the others go on.
    """
    constrained = [
        (index, row)
        for index, row in enumerate(rows)
        if row is not None and row.constraint is not None and not row.done
    ]
    if not constrained:
        return None
    import torch

    bitmask = torch.full((len(rows), bitmask_words(vocab_size)), -1, dtype=torch.int32)
    for index, row in constrained:
        try:
            row.constraint.fill(bitmask, index)  # type: ignore[union-attr]
        except Exception as error:
            fail_row(row, error)  # type: ignore[arg-type]
    return allowed_tokens(bitmask.to(device), vocab_size)


def fail_row(row: _Row, error: BaseException) -> None:
    """End `row`'s request with `error`, and only its request (a finished row is left alone)."""
    if not row.done:
        row.done = True
        row.stream._put(error)


def advance_or_fail(row: _Row, token_id: int, eos_id: int | None) -> None:
    """`_Row.advance`; an error there (its grammar, its text) ends that row's request alone."""
    try:
        row.advance(token_id, eos_id)
    except Exception as error:
        fail_row(row, error)


_workers: dict[threading.Thread, list[_Row]] = {}
_workers_lock = threading.Lock()


@atexit.register
def _stop_workers() -> None:
    """At exit, cancel what is still decoding and let it finish its step (no torch op is cut)."""
    with _workers_lock:
        running = list(_workers.items())
    for _, rows in running:
        for row in rows:
            row.stream.cancel()
    for worker, _ in running:
        worker.join(timeout=30)


class BatchGroup:
    """Gathers the requests of one ``.batch()`` call into one padded engine batch.

    LangChain runs a chat model's ``batch`` as concurrent ``invoke`` calls. While a group is
    active (see `batch_group`), `submit_request` holds each request until the expected number
    have arrived (or ``window`` seconds pass without a new one, e.g. when an input failed before
    reaching the engine), then submits them together, one batch per engine.
    """

    def __init__(self, expected: int, window: float = 0.05) -> None:
        """Expect `expected` requests at once (a batch's size, or its ``max_concurrency``)."""
        self._expected = expected
        self._window = window
        self._pending: list[tuple[BaseEngine, GenerationRequest, _Slot]] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def join(self, engine: BaseEngine, request: GenerationRequest) -> "_Slot":
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
        return self._ready.is_set()

    def _fill(self, stream: TokenStream | None, error: BaseException | None) -> None:
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
        self._ready.wait(self._remaining())
        return self._result()

    async def await_stream(self) -> TokenStream:
        while not self._ready.is_set():
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                break
            await asyncio.sleep(0.001)
        return self._result()


def _launch(batch: list[tuple[BaseEngine, GenerationRequest, _Slot]]) -> None:
    """Start one padded batch per engine; a request that fails to start fails alone.

    Every slot is filled, whatever goes wrong: with its stream, or with the error that kept
    its request (or its engine's batch) from starting.
    """
    by_engine: dict[int, list[tuple[BaseEngine, GenerationRequest, _Slot]]] = {}
    for entry in batch:
        by_engine.setdefault(id(entry[0]), []).append(entry)
    try:
        for entries in by_engine.values():
            engine = entries[0][0]
            rows, slots = [], []
            for _, request, slot in entries:
                try:
                    rows.append(engine._row(request))
                    slots.append(slot)
                except Exception as error:
                    slot._fill(None, error)
            if not rows:
                continue
            try:
                engine._start(rows)
            except Exception as error:
                for slot in slots:
                    slot._fill(None, error)
                continue
            for row, slot in zip(rows, slots, strict=True):
                slot._fill(row.stream, None)
    finally:
        unfilled = [slot for _, _, slot in batch if not slot.filled]
        for slot in unfilled:  # an error past the ones above (KeyboardInterrupt, say)
            slot._fill(None, EngineStoppedError("The batch could not be started."))


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


def open_stream(engine: Any, request: GenerationRequest) -> Iterator[TokenEvent]:
    """Start one request (through the active batch group, if any) and return its stream.

    A remote engine (`langchain_synthia._remote.RemoteEngine`) streams its own way, and its
    server batches concurrent requests itself.
    """
    if not engine.batches_locally:
        return engine.open(request)
    group = _ACTIVE_GROUP.get()
    if group is None:
        return engine.submit([request])[0]
    return group.join(engine, request).wait()


async def aopen_stream(engine: Any, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
    """`open_stream` for async callers: waiting for the batch never blocks the event loop."""
    if not engine.batches_locally:
        return engine.aopen(request)
    group = _ACTIVE_GROUP.get()
    if group is None:
        return engine.submit([request])[0]
    return await group.join(engine, request).await_stream()
