"""The fast engine: one scheduler thread, continuous batching, CUDA-graph decode steps.

Requests join and leave between steps: a new request is prefilled into a free cache row and
decodes with the others from the next step on; a finished or cancelled one frees its row. Each
step decodes the smallest captured batch size that covers the busy rows (on CUDA a replay of a
graph captured at load), samples on the device, and streams every row's token to its caller.
"""

import atexit
import contextlib
import logging
import threading
from typing import Any

import torch

from langchain_synthia._decoding_row import DecodingRow, advance_or_fail, fail_row, grammar_mask
from langchain_synthia._fast_model import FastMistral
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._prefix_cache import PrefixCache
from langchain_synthia._sampling import GREEDY, BatchSampler

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Decode batch sizes that are captured as graphs (up to the engine's ``max_batch``)."""

SUFFIX_SIZES = (16, 32, 64, 128)
"""With the prefix cache on: a prompt's rest after a reused prefix, up to this many tokens,
runs as one step of a graph captured for these token counts (its tokens as the rows of a
decode step, all in one cache row). Eager, its few hundred kernel launches took most of the
call's time."""

PREFILL_TOKENS = 2048
"""Most prompt tokens prefilled in one pass. A longer prompt, or a burst of requests, is
prefilled in several passes: this bounds the activations' memory (a 4k context fits 6 GiB)."""

DENSE_PREFILL_TOKENS = 8192
"""The same bound on a card with the dense-prefill copy (which has memory to spare): every
pass dequantises all the weights once (6.4 ms on an H100), so fewer, larger passes."""


def _passes(
    prompts: list[tuple[int, list[int], int]], budget: int
) -> list[list[tuple[int, list[int], int]]]:
    """Cut prompts ``(cache row, ids, start)`` into passes of at most `budget` tokens.

    A prompt longer than what is left of a pass continues in the next one, from where it was
    cut (its earlier pieces are already in its cache row by then).
    """
    passes: list[list[tuple[int, list[int], int]]] = [[]]
    size = 0
    for slot, ids, start in prompts:
        offset = 0
        while offset < len(ids):
            if size == budget:
                passes.append([])
                size = 0
            piece = ids[offset : offset + budget - size]
            passes[-1].append((slot, piece, start + offset))
            size += len(piece)
            offset += len(piece)
    return [part for part in passes if part]  # none at all when every prompt was handled


class GenerationClosedError(RuntimeError):
    """The engine shut down (at interpreter exit, or `FastEngine.close`)."""


class EngineOutOfMemoryError(torch.OutOfMemoryError, MemoryError):
    """A step ran out of memory: the message names the settings that make the engine fit.

    A subclass of both `torch.OutOfMemoryError` (``torch.cuda.OutOfMemoryError``, a
    `RuntimeError`) and `MemoryError`, so that callers catching either still do; the original
    error is its ``__cause__``.
    """


_running: list["FastEngine"] = []


@atexit.register
def _close_engines() -> None:
    """Stop the schedulers before the interpreter tears down (no thread dies inside CUDA)."""
    for engine in list(_running):
        engine.close()


class FastEngine(LocalEngine):
    """Serve a `FastMistral` to any number of concurrent requests."""

    kind = "fast"

    def __init__(
        self, model: FastMistral, tokenizer: Any, *, name: str, graphs: bool,
        prefix_tokens: int = 0,
    ) -> None:  # fmt: skip
        """Serve `model`.

        `graphs` captures the decode steps as CUDA graphs; `prefix_tokens` bounds the KV cache
        of prompt prefixes kept for reuse (0: no reuse).
        """
        super().__init__(tokenizer, name=name, device=model.device, max_len=model.max_len)
        self.model = model
        self.prefixes = PrefixCache(prefix_tokens)
        self.sizes = [s for s in BATCH_SIZES if s < model.max_batch] + [model.max_batch]
        self._slots: list[DecodingRow | None] = [None] * model.max_batch
        self._waiting: list[DecodingRow] = []
        self._wake = threading.Condition()
        self._tokens = torch.zeros(model.max_batch, dtype=torch.long, device=model.device)
        self._positions = torch.zeros(model.max_batch, dtype=torch.long, device=model.device)
        self._busy = torch.zeros(model.max_batch, dtype=torch.long, device=model.device)
        """1 for rows that hold a request: only their positions advance (free rows stay at 0)."""
        self._sampler = BatchSampler(
            [GREEDY] * model.max_batch, [[]] * model.max_batch, model.vocab_size, model.device
        )
        cuda = model.device.type == "cuda"
        self._host = [
            (
                torch.zeros(model.max_batch, dtype=torch.long, pin_memory=cuda),
                torch.cuda.Event() if cuda else None,
            )
            for _ in range(2)
        ]
        """Two host buffers for sampled tokens, each with the event that says it is filled: one
        is filled while the other is read."""
        self._flip = 0
        self._pending: tuple[Any, torch.Tensor, list[DecodingRow | None]] | None = None
        """The step in flight: its ready event, its host tokens, the rows it decoded."""
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._suffix_sizes = [s for s in SUFFIX_SIZES if s <= model.max_len and prefix_tokens]
        longest = max(self._suffix_sizes, default=0)
        self._suffix = torch.zeros((3, longest), dtype=torch.long, device=model.device)
        """The inputs of a suffix step: tokens, their positions, their cache row."""
        self._suffix_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self._capture()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="synthia-scheduler", daemon=True)
        self._thread.start()
        _running.append(self)

    def close(self) -> None:
        """Stop the scheduler after its current step; requests still open are cancelled."""
        with self._wake:
            self._closing = True
            for row in [*self._waiting, *self._slots]:
                if row is not None:
                    row.stream.cancel()
            self._wake.notify()
        self._thread.join(timeout=30)
        if self in _running:
            _running.remove(self)

    def start(self, rows: list[DecodingRow]) -> None:
        """Queue `rows` for the scheduler, which prefills them as cache rows come free."""
        for row in rows:
            row.stream.producer = self._thread
        with self._wake:
            self._waiting.extend(rows)
            self._wake.notify()

    # -- the scheduler ----------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or any(self._slots) or self._pending or self._closing):
                    self._wake.wait()
                if self._closing:
                    self._fail_all(GenerationClosedError("The engine was closed."), locked=True)
                    return
                joining = self._take_waiting()
            doing = "prefilling"
            try:
                with torch.inference_mode():
                    if joining:
                        self._prefill(joining)
                    self._release_finished()
                    doing = "decoding"
                    if any(self._slots):
                        self._step()  # launches this step, then hands out the last one's tokens
                    else:
                        self._deliver()
                    self._release_finished()
            except BaseException as error:
                logger.exception("%s failed", doing)
                if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
                    error = self._out_of_memory(error, doing)
                self._fail_all(error)

    def _out_of_memory(self, error: BaseException, doing: str) -> EngineOutOfMemoryError:
        """The error every request in flight gets for `error`, saying how to fit next time.

        The rows in flight cannot go on (their step is lost), but the engine can: the next
        call starts from free rows. On CUDA, what the failed step's allocator cached goes back.
        """
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rows = sum(row is not None for row in self._slots) + len(self._waiting)
        model = self.model
        said = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        dense = ", dense_prefill=False (frees the dense-prefill copy of the weights)"
        msg = (
            f"Out of {'GPU ' if self.device.type == 'cuda' else ''}memory while {doing} "
            f"({rows} request{'s' if rows != 1 else ''} stopped): {said}. "
            f"To fit, load the model with a smaller batch (max_batch_size={model.max_batch} "
            f"now), a shorter context (context_window={model.max_len} now)"
            f"{dense if model.dense_prefill else ''}, or a smaller branch (revision='main', "
            "4-bit, is the smallest); see 'Out of GPU memory' in docs/troubleshooting.md. The "
            "engine stays loaded and serves the next call."
        )
        wrapped = EngineOutOfMemoryError(msg)
        wrapped.__cause__ = error
        return wrapped

    def _take_waiting(self) -> list[tuple[int, DecodingRow]]:
        joining = []
        free = [i for i, row in enumerate(self._slots) if row is None]
        while self._waiting and free:
            row = self._waiting.pop(0)
            if row.stream.cancelled.is_set():
                row.stream.put(None)
                continue
            slot = free.pop(0)
            self._slots[slot] = row
            joining.append((slot, row))
        return joining

    def _prefill(self, joining: list[tuple[int, DecodingRow]]) -> None:
        """Prefill new requests (reusing cached prefixes); sample their first tokens."""
        prompts = []
        last: dict[int, torch.Tensor] = {}
        for slot, row in joining:
            reused, keys, values = self.prefixes.longest(row.prompt_ids)
            rest = row.prompt_ids[reused:]
            if reused:
                self.model.k_cache[:, slot, :reused].copy_(keys)
                self.model.v_cache[:, slot, :reused].copy_(values)
                if len(rest) <= max(self._suffix_sizes, default=0):
                    last[slot] = self._prefill_suffix(slot, rest, reused)
                    continue
            prompts.append((slot, rest, reused))
        budget = DENSE_PREFILL_TOKENS if self.model.dense_prefill else PREFILL_TOKENS
        for part in _passes(prompts, budget):
            logits = self.model.prefill_many(part)
            last.update((slot, logits[i]) for i, (slot, _, _) in enumerate(part))
        for slot, row in joining:
            try:
                self._first_token(slot, row, last[slot])
            except Exception as error:  # this request's settings, grammar or text: it alone
                logger.exception("the first token of a request failed")
                fail_row(row, error)  # its cache row is freed with the finished ones
        for slot, row in joining:  # after the first tokens are out (decoding never writes here)
            cache = (self.model.k_cache[:, slot], self.model.v_cache[:, slot])
            self.prefixes.store(row.prompt_ids, *cache)

    def _first_token(self, slot: int, row: DecodingRow, logits: torch.Tensor) -> None:
        """Set up cache row `slot`'s sampling for `row`, sample its first token, send it."""
        ids = row.prompt_ids
        self._sampler.assign(slot, row.stream.request.sampling, ids)
        allowed = grammar_mask([row], self.model.vocab_size, self.device)
        if row.done:  # its grammar failed
            return
        token = int(self._sampler.sample(logits[None], row=slot, allowed=allowed)[0])
        self._tokens[slot] = token
        self._positions[slot] = len(ids)
        self._busy[slot] = 1
        row.advance(token, self.eos_id)

    def _prefill_suffix(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Prefill `ids` (positions ``start...``) in cache row `slot`; the last token's logits.

        It runs as one decode-shaped step (a captured graph on CUDA), padded to a captured size
        with copies of the last token: they compute and write the same key and value at the same
        position, so they change nothing.
        """
        count = len(ids)
        size = next(s for s in self._suffix_sizes if s >= count)
        pad = size - count
        inputs = torch.tensor(
            [ids + ids[-1:] * pad,
             list(range(start, start + count)) + [start + count - 1] * pad,
             [slot] * size],
            dtype=torch.long,
        )  # fmt: skip
        self._suffix[:, :size].copy_(inputs)
        graph = self._suffix_graphs.get(size)
        if graph is None:
            logits = self.model.decode(size, *self._suffix)
        else:
            graph[0].replay()
            logits = graph[1]
        return logits[count - 1].clone()  # the graph's output buffer is reused

    def _step(self) -> None:
        """Launch one decode step, then hand out the previous step's tokens while it runs.

        The device never waits for the host: the sampled tokens feed the next step on the
        device, and their copy to the host is read one step later. A row that finished in the
        previous step has decoded one token too many; it is dropped unread. Rows under a
        grammar need their previous token before this step's can be sampled: then the
        previous step is handed out first, and the masks are computed while the step runs.
        """
        busy = max(i for i, row in enumerate(self._slots) if row is not None) + 1
        size = next(s for s in self.sizes if s >= busy)
        graph = self._graphs.get(size)
        if graph is None:
            logits = self.model.decode(size, self._tokens, self._positions)
        else:
            graph[0].replay()
            logits = graph[1]
        allowed = None
        if any(row is not None and row.constraint is not None for row in self._slots[:size]):
            self._deliver()
            allowed = grammar_mask(self._slots[:size], self.model.vocab_size, self.device)
        chosen = self._sampler.sample(logits, allowed=allowed)
        self._tokens[:size] = chosen
        self._positions[:size] += self._busy[:size]
        buffer, ready = self._host[self._flip]
        self._flip ^= 1
        host = buffer[:size]
        host.copy_(chosen, non_blocking=True)
        if ready is not None:
            ready.record()
        self._deliver()
        self._pending = (ready, host, self._slots[:size])

    def _deliver(self) -> None:
        """Send each row its token from the step launched last (waiting for it if needed)."""
        if self._pending is None:
            return
        ready, host, rows = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()
        for row, token in zip(rows, host.tolist(), strict=True):
            if row is not None and not row.done and not row.stream.cancelled.is_set():
                advance_or_fail(row, token, self.eos_id)

    def _release_finished(self) -> None:
        for slot, row in enumerate(self._slots):
            if row is not None and (row.done or row.stream.cancelled.is_set()):
                if not row.done:
                    row.stream.put(None)
                self._slots[slot] = None
                self._positions[slot] = 0
                self._busy[slot] = 0
                self._sampler.assign(slot, GREEDY, ())

    def _fail_all(self, error: BaseException, *, locked: bool = False) -> None:
        with contextlib.nullcontext() if locked else self._wake:
            rows = [row for row in self._slots if row is not None] + self._waiting
            self._waiting.clear()
        self._slots = [None] * len(self._slots)
        self._pending = None
        self._positions.zero_()
        self._busy.zero_()
        for slot in range(len(self._slots)):  # as `_release_finished` leaves a free row
            self._sampler.assign(slot, GREEDY, ())
        for row in rows:
            fail_row(row, error)

    # -- CUDA graphs ------------------------------------------------------------------------

    def _capture(self) -> None:
        """Capture one decode graph per batch size (the kernels compile on the warm-up run)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = None

        def capture(size: int, *inputs: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
            nonlocal pool
            for _ in range(2):
                self.model.decode(size, *inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self.model.decode(size, *inputs)
            pool = graph.pool()
            return graph, logits

        with torch.cuda.stream(stream), torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: smaller ones reuse its memory
                self._graphs[size] = capture(size, self._tokens, self._positions)
            for size in reversed(self._suffix_sizes):
                self._suffix_graphs[size] = capture(size, *self._suffix)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.model.k_cache.zero_()  # the warm-up steps wrote into it
        self.model.v_cache.zero_()
