"""The fast engine: one scheduler thread, continuous batching over a paged KV cache.

Every step, the scheduler (`langchain_synthia.engine.Scheduler`) says which prompts prefill
(a chunk each) and which requests decode a token; the block manager hands out the KV blocks
they write and shares cached prompt blocks between requests. A request holds one of the
``max_batch`` decode rows from admission to its end; a row that holds no request reads and
writes only the null block. Each decode step runs the smallest captured batch size that covers
the busy rows (on CUDA a replay of a graph captured at load), samples on the device, and
streams every row's token to its caller one step later, so that the device never waits for
the host. The KV cache is sized at load from the memory left (`kv_cache_blocks`).
"""

import atexit
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from langchain_synthia._decoding_row import DecodingRow, advance_or_fail, fail_row, grammar_mask
from langchain_synthia._fast_model import FastMistral
from langchain_synthia._kernels import release_scratch_buffer
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._model_runner import ModelRunner
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._sampling import GREEDY, BatchSampler
from langchain_synthia._token_stream import engine_closed_error
from langchain_synthia.engine import (
    BlockManager,
    EngineObserver,
    PrefillChunk,
    Scheduler,
    Sequence,
)

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Decode batch sizes that are captured as graphs (up to the engine's ``max_batch``)."""

SUFFIX_SIZES = (16, 32, 64)
"""A prompt's rest after cached blocks, up to this many tokens, runs as one step of a graph
captured for these token counts (its tokens as the rows of a decode step, all of one block
table). Eager, its few hundred kernel launches would take most of the call's time."""

MIN_PREFILL_PART = 16
"""Fewest prompt tokens a prefill that ran out of memory is cut down to (`_prefill_passes`)."""

PREFILL_TOKENS = 2048
"""Most prompt tokens prefilled in one step. A longer prompt, or a burst of requests, is
prefilled over several steps: this bounds the activations' memory."""

DENSE_PREFILL_TOKENS = 8192
"""The same bound on a card with the dense-prefill copy (which has memory to spare): every
pass dequantises all the weights once, so fewer, larger passes."""

BLOCK_SIZE = 16
"""Positions a KV block holds: the unit of allocation and of prefix sharing."""

CPU_KV_ROWS = 8
"""On the CPU, the KV cache holds this many full context windows (or ``max_batch`` if fewer)
unless ``kv_cache_tokens`` says otherwise."""

GRAPH_RESERVE = 256 << 20
"""GPU memory kept out of the KV cache for the decode graphs' own allocations and the
sampler's work."""


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


def kv_cache_blocks(
    model: FastMistral, *, block_size: int, prefill_tokens: int, graph_sizes: list[int],
    gpu_memory_utilization: float, kv_cache_tokens: int | None, baseline: int = 0,
) -> int:  # fmt: skip
    """How many KV blocks of `block_size` positions the engine of `model` gets.

    `kv_cache_tokens` fixes it. Otherwise, on the CPU, `CPU_KV_ROWS` context windows; on a GPU,
    what is left of ``gpu_memory_utilization`` of the card once this engine's weights, the
    decode buffers of every graph size and the peak of a prefill of `prefill_tokens` tokens
    are counted (`baseline`: the bytes the process's allocator held before the model loaded),
    less `GRAPH_RESERVE`; never more than the GPU has free, than the process's share (if
    ``torch.cuda.set_per_process_memory_fraction`` set one) leaves, or than ``max_batch``
    requests of a whole context window each could use.

    Raises:
        EngineOutOfMemoryError: If that leaves no room for a single context window.
    """
    if kv_cache_tokens is not None:
        return max(1, math.ceil(kv_cache_tokens / block_size))
    if model.device.type != "cuda":
        return math.ceil(min(model.max_batch, CPU_KV_ROWS) * (model.max_len + 1) / block_size)
    device = model.device
    longest = min(prefill_tokens, model.max_len)  # one prompt's most (the rotary table's end)
    lengths = [longest] * (prefill_tokens // longest)
    lengths += [prefill_tokens % longest] if prefill_tokens % longest else []
    per_prompt = math.ceil(longest / block_size)
    model.allocate_kv(per_prompt * len(lengths), block_size)
    trial_bytes = model.k_cache.numel() * 4  # keys and values, fp16
    prompts = [
        (list(range(i * per_prompt, (i + 1) * per_prompt)), [0] * length, 0)
        for i, length in enumerate(lengths)
    ]
    with torch.inference_mode():
        model.prepare_decode_buffers(graph_sizes, SUFFIX_SIZES)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        model.prefill_many(prompts)
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device) - trial_bytes - baseline  # this engine's
    # the trial's dequantisation scratch belongs to this (loading) thread; the scheduler
    # thread makes its own, of the same size, which `peak` counts: free this one
    release_scratch_buffer(device)
    model.allocate_kv(1, block_size)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    free, _ = torch.cuda.mem_get_info(device)
    room = min(
        total * gpu_memory_utilization - peak, total * fraction - baseline - peak, free
    ) - GRAPH_RESERVE  # fmt: skip
    per_block = model.kv_bytes_per_token * block_size
    most = math.ceil(model.max_batch * (model.max_len + 1) / block_size)
    blocks = min(int(room // per_block), most)
    if blocks * block_size < model.max_len:
        msg = (
            f"Out of GPU memory for the KV cache: after the weights and working buffers "
            f"({peak / 2**30:.2f} GiB), {max(room, 0) / 2**30:.2f} GiB are left of "
            f"gpu_memory_utilization={gpu_memory_utilization} (card: {total / 2**30:.1f} GiB, "
            f"free: {free / 2**30:.1f} GiB), fewer than one context window of "
            f"{model.max_len} tokens ({model.max_len * model.kv_bytes_per_token / 2**30:.2f} "
            "GiB). Raise gpu_memory_utilization, unload another model this process loaded "
            "(its .unload()), close what else uses the GPU, lower max_batch_size or "
            "context_window, or load a smaller branch (revision='main'); see 'Out of GPU "
            "memory' in docs/troubleshooting.md."
        )
        raise EngineOutOfMemoryError(msg)
    return blocks


class FastEngine(LocalEngine):
    """Serve a `FastMistral` to any number of concurrent requests over a paged KV cache."""

    kind = "fast"

    def __init__(
        self, model: FastMistral, tokenizer: Any, *, name: str, graphs: bool,
        num_blocks: int, block_size: int = BLOCK_SIZE, prefix_caching: bool = True,
    ) -> None:  # fmt: skip
        """Serve `model` with a KV cache of `num_blocks` blocks of `block_size` positions.

        `graphs` captures the decode steps as CUDA graphs; `prefix_caching` shares the
        cached blocks of a prompt's prefix with later prompts that start the same way.
        """
        super().__init__(tokenizer, name=name, device=model.device, max_len=model.max_len)
        self.model = model
        model.allocate_kv(num_blocks, block_size)
        self.blocks = BlockManager(
            num_blocks, block_size, window=model.sliding_window, prefix_caching=prefix_caching
        )
        budget = DENSE_PREFILL_TOKENS if model.dense_prefill else PREFILL_TOKENS
        self.scheduler = Scheduler(
            self.blocks, max_batch_size=model.max_batch, max_prefill_tokens=budget
        )
        self._slots: list[DecodingRow | None] = [None] * model.max_batch
        """The request that holds each decode row, from its admission to its end."""
        self._sequences: list[Sequence | None] = [None] * model.max_batch
        self._decoding = [False] * model.max_batch
        """Rows whose prompt is computed: they decode in every step (busy in the runner)."""
        self._queued: dict[Sequence, DecodingRow] = {}
        """Requests the scheduler holds that have no decode row yet."""
        self._waiting: list[DecodingRow] = []
        """Requests handed over by callers, not yet seen by the scheduler thread."""
        self._wake = threading.Condition()
        self._sampler = BatchSampler(
            [GREEDY] * model.max_batch, [[]] * model.max_batch, model.vocab_size, model.device
        )
        self._cuda = model.device.type == "cuda"
        self._host = [
            (
                torch.zeros(model.max_batch, dtype=torch.long, pin_memory=self._cuda),
                torch.cuda.Event() if self._cuda else None,
            )
            for _ in range(2)
        ]
        """Two host buffers for sampled tokens, each with the event that says it is filled: one
        is filled while the other is read."""
        self._flip = 0
        self._pending: tuple[Any, torch.Tensor, list[DecodingRow | None]] | None = None
        """The step in flight: its ready event, its host tokens, the rows it decoded."""
        self.prefix_hit_tokens = 0
        """Prompt tokens found in the prefix cache (not computed again) since the load."""
        self.prefill_splits = 0
        """Prefill passes cut in two because GPU memory ran out (`_prefill_passes`)."""
        self._table_writes: list[tuple[int, int, int]] = []
        """(row, entry, block) writes to the device block tables, flushed before a step."""
        rests = [s for s in SUFFIX_SIZES if s <= model.max_len and prefix_caching]
        self.runner = ModelRunner(
            model, sizes=graph_sizes(model.max_batch), rest_sizes=rests, graphs=graphs
        )
        self._observers: list[EngineObserver] = []
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="synthia-scheduler", daemon=True)
        self._thread.start()
        _running.append(self)

    @contextlib.contextmanager
    def observe(self, observer: EngineObserver) -> Iterator[EngineObserver]:
        """Report this engine's events to `observer` while the block runs.

        See `langchain_synthia.engine.observer` for the events and where they run.
        """
        self._observers = [*self._observers, observer]  # swapped whole: read without a lock
        try:
            yield observer
        finally:
            self._observers = [o for o in self._observers if o is not observer]

    def close(self) -> None:
        """Stop the scheduler after its current step (waits for it, up to 30 s).

        Requests still open, and any submitted after, end with `EngineStoppedError`
        (`engine_closed_error`): none is cut short and returned as if it had finished.
        """
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)
        if self in _running:
            _running.remove(self)

    @property
    def num_waiting(self) -> int:
        """Requests queued without a decode row yet (waiting for memory or for a row)."""
        return len(self._waiting) + len(self._queued)

    def row_for(self, request: GenerationRequest) -> DecodingRow:
        """`LocalEngine.row_for`, and a request that could never fit the KV cache is refused.

        Raises:
            ValueError: If the prompt does not fit the context window or, with its answer,
                the whole KV cache (nothing is truncated), or is not text.
        """
        row = super().row_for(request)
        self.scheduler.check_fits(len(row.prompt_ids), row.budget)
        return row

    def start(self, rows: list[DecodingRow]) -> None:
        """Queue `rows` for the scheduler, which admits them as KV blocks allow."""
        for row in rows:
            row.stream.producer = self._thread
        with self._wake:
            if self._closing:
                for row in rows:
                    fail_row(row, engine_closed_error())
                return
            self._waiting.extend(rows)
            self._wake.notify()
        for observer in self._observers:
            observer.requests_arrived(count=len(rows))

    # -- the scheduler thread -----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (
                    self._waiting or self.scheduler.has_work or self._pending or self._closing
                ):
                    self._wake.wait()
                if self._closing:
                    self._fail_all(engine_closed_error(), locked=True)
                    return
                arriving, self._waiting = self._waiting, []
            doing = "prefilling"
            try:
                with torch.inference_mode():
                    self._submit(arriving)
                    self._release_finished()
                    step = self.scheduler.schedule()
                    observers = self._observers
                    tokens = sum(len(c.token_ids) for c in step.prefills) if observers else 0
                    if observers:
                        self._report_schedule(observers, tokens)
                    begun = time.perf_counter()
                    computed = self._prefill(step.prefills) if step.prefills else []
                    if observers and step.prefills:
                        seconds = time.perf_counter() - begun
                        for observer in observers:
                            observer.prefilled(
                                seconds=seconds, chunks=len(step.prefills), tokens=tokens
                            )
                    doing = "decoding"
                    if step.decodes:
                        self._note_new_blocks(step.decodes)
                        self._step()  # launches this step, then hands out the last one's tokens
                    else:
                        self._deliver()
                    self._start_decoding(computed)
                    self._release_finished()
            except BaseException as error:
                logger.exception("%s failed", doing)
                if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
                    error = self._out_of_memory(error, doing)
                self._fail_all(error)

    def _report_schedule(self, observers: list[EngineObserver], prefill_tokens: int) -> None:
        blocks = self.blocks
        for observer in observers:
            observer.scheduled(
                decoding=sum(self._decoding), waiting=self.num_waiting,
                blocks_in_use=blocks.num_blocks - blocks.num_free_blocks,
                prefill_tokens=prefill_tokens,
            )  # fmt: skip

    def _finish(self, sequence: Sequence, *, cache: bool = True) -> None:
        """Give `sequence`'s blocks back to the scheduler (`cache`: see `Scheduler.finish`)."""
        if self._observers:
            prompt = sequence.num_prompt_tokens
            ended = {
                "prompt_ids": list(sequence.token_ids[:prompt]),
                "generated": list(sequence.token_ids[prompt:]),
                "held_blocks": sequence.num_held_blocks,
            }
            for observer in self._observers:
                observer.finished(**ended)
        self.scheduler.finish(sequence, cache=cache)

    def _submit(self, rows: list[DecodingRow]) -> None:
        """Hand `rows` to the scheduler; one that can never fit fails alone."""
        for row in rows:
            if row.stream.cancelled.is_set():
                row.stream.put(None)
                continue
            sequence = Sequence(row.prompt_ids, row.budget)
            try:
                self.scheduler.submit(sequence)
            except ValueError as error:
                fail_row(row, error)
                continue
            self._queued[sequence] = row

    def _out_of_memory(self, error: BaseException, doing: str) -> EngineOutOfMemoryError:
        """The error every request in flight gets for `error`, saying how to fit next time.

        The requests in flight cannot go on (their step is lost), but the engine can: the
        next call starts from free rows. On CUDA, what the failed step's allocator cached
        goes back.
        """
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
        count = sum(row is not None for row in self._slots) + len(self._queued)
        model = self.model
        said = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        dense = ", dense_prefill=False (frees the dense-prefill copy of the weights)"
        msg = (
            f"Out of {'GPU ' if cuda else ''}memory while {doing} "
            f"({count} request{'s' if count != 1 else ''} stopped): {said}. "
            f"To fit, load the model with a lower gpu_memory_utilization (leaves more room "
            f"outside the KV cache), a smaller max_batch_size ({model.max_batch} now)"
            f"{dense if model.dense_prefill else ''}, or a smaller branch (revision='main', "
            "4-bit, is the smallest); see 'Out of GPU memory' in docs/troubleshooting.md. The "
            "engine stays loaded and serves the next call."
        )
        wrapped = EngineOutOfMemoryError(msg)
        wrapped.__cause__ = error
        return wrapped

    def _row_of(self, sequence: Sequence) -> int:
        """The decode row of `sequence`, given the first free one on its first chunk."""
        if sequence in self._queued:
            self.prefix_hit_tokens += sequence.num_cached_tokens
            slot = self._slots.index(None)
            self._slots[slot] = self._queued.pop(sequence)
            self._sequences[slot] = sequence
            return slot
        return self._sequences.index(sequence)

    def _prefill(self, chunks: list[PrefillChunk]) -> list[tuple[int, torch.Tensor]]:
        """Compute this step's prompt chunks; the last logits of each prompt now computed.

        Their first tokens are sampled after this step's decode is launched
        (`_start_decoding`): the decode samples every row, and must not draw from the
        random generator of a request that is not decoding yet.
        """
        slots = [self._row_of(chunk.sequence) for chunk in chunks]
        last: dict[int, torch.Tensor] = {}
        passes = []
        for slot, chunk in zip(slots, chunks, strict=True):
            rest = chunk.token_ids
            if (
                chunk.start
                and chunk.completes_prompt
                and len(rest) <= max(self.runner.rest_sizes, default=0)
            ):
                last[slot] = self._prefill_suffix(chunk.block_table, rest, chunk.start)
            else:
                passes.append((slot, (list(chunk.block_table), rest, chunk.start)))
        if passes:
            logits = self._prefill_passes([prompt for _, prompt in passes])
            last.update((slot, logits[i]) for i, (slot, _) in enumerate(passes))
        return [
            (slot, last[slot])
            for slot, chunk in zip(slots, chunks, strict=True)
            if chunk.completes_prompt
        ]

    def _prefill_passes(self, prompts: list[tuple[list[int], list[int], int]]) -> torch.Tensor:
        """`FastMistral.prefill_many` of `prompts`, in smaller passes if memory runs out.

        A pass that runs out of GPU memory (the memory beside the KV cache can be cut into
        pieces none of which holds a whole pass's activations) is run again as two: the
        prompts in two groups, or one prompt's tokens in two parts (the second after the
        first's cached positions). The results are those of one pass; a part of
        `MIN_PREFILL_PART` tokens or fewer that still does not fit raises the error.
        """
        try:
            return self.model.prefill_many(prompts)
        except torch.OutOfMemoryError:
            if len(prompts) == 1 and len(prompts[0][1]) <= MIN_PREFILL_PART:
                raise
        if self._cuda:
            torch.cuda.empty_cache()
        if not self.prefill_splits:
            logger.warning(
                "A prefill ran out of GPU memory and runs in smaller passes; a lower "
                "gpu_memory_utilization leaves more room beside the KV cache."
            )
        self.prefill_splits += 1
        if len(prompts) > 1:
            half = len(prompts) // 2
            return torch.cat(
                [self._prefill_passes(prompts[:half]), self._prefill_passes(prompts[half:])]
            )
        table, ids, start = prompts[0]
        half = len(ids) // 2
        self._prefill_passes([(table, ids[:half], start)])
        return self._prefill_passes([(table, ids[half:], start + half)])

    def _start_decoding(self, computed: list[tuple[int, torch.Tensor]]) -> None:
        """Sample and send the first token of each `computed` prompt.

        Its row then decodes from the next step on (token, position and block table set on
        the device).
        """
        for slot, logits in computed:
            row = self._slots[slot]
            if row is None or row.done or row.stream.cancelled.is_set():
                continue
            try:
                self._first_token(slot, row, logits)
            except Exception as error:  # this request's settings, grammar or text: it alone
                logger.exception("the first token of a request failed")
                fail_row(row, error)  # its blocks are freed with the finished ones
                continue
            sequence = self._sequences[slot]
            if row.done or sequence is None:
                continue
            self.runner.start_row(slot, sequence.token_ids[-1], sequence.num_prompt_tokens)
            self._decoding[slot] = True
            self._table_writes.extend(
                (slot, index, block) for index, block in enumerate(sequence.block_table)
            )
        self._flush_table_writes()

    def _first_token(self, slot: int, row: DecodingRow, logits: torch.Tensor) -> None:
        """Set up decode row `slot`'s sampling for `row`, sample its first token, send it."""
        ids = row.prompt_ids
        self._sampler.assign(slot, row.stream.request.sampling, ids)
        allowed = grammar_mask([row], self.model.vocab_size, self.device)
        if row.done:  # its grammar failed
            return
        token = int(self._sampler.sample(logits[None], row=slot, allowed=allowed)[0])
        self._sequences[slot].append_token(token)  # type: ignore[union-attr]
        row.advance(token, self.eos_id)

    def _note_new_blocks(self, decodes: list) -> None:
        """Write the block each decode opened this step into its row's device table."""
        size = self.blocks.block_size
        for decode in decodes:
            if decode.position % size == 0:
                slot = self._sequences.index(decode.sequence)
                index = decode.position // size
                self._table_writes.append((slot, index, decode.sequence.block_table[index]))
        self._flush_table_writes()

    def _flush_table_writes(self) -> None:
        """Apply the pending block-table writes on the device (in stream order, no wait)."""
        if not self._table_writes:
            return
        writes = torch.tensor(self._table_writes, dtype=torch.int64).T.contiguous()
        self._table_writes.clear()
        if self._cuda:
            writes = writes.pin_memory().to(self.device, non_blocking=True)
        self.model.tables[writes[0], writes[1]] = writes[2].to(torch.int32)

    def _prefill_suffix(self, table: list[int], ids: list[int], start: int) -> torch.Tensor:
        """Prefill a prompt's rest `ids` (positions ``start...``) as one decode-shaped step."""
        return self.runner.decode_rest(table, ids, start)

    def _step(self) -> None:
        """Launch one decode step, then hand out the previous step's tokens while it runs.

        The device never waits for the host: the sampled tokens feed the next step on the
        device, and their copy to the host is read one step later. A row that finished in the
        previous step has decoded one token too many; it is dropped unread. Rows under a
        grammar need their previous token before this step's can be sampled: then the
        previous step is handed out first, and the masks are computed while the step runs.
        """
        busy = max(i for i, decoding in enumerate(self._decoding) if decoding) + 1
        size = self.runner.size_for(busy)
        rows = [row if self._decoding[i] else None for i, row in enumerate(self._slots[:size])]
        logits = self.runner.decode(size)
        allowed = None
        if any(row is not None and row.constraint is not None for row in rows):
            self._deliver()
            allowed = grammar_mask(rows, self.model.vocab_size, self.device)
        chosen = self._sampler.sample(logits, allowed=allowed)
        self.runner.advance(size, chosen)
        for observer in self._observers:
            observer.step_launched(rows=size)
        buffer, ready = self._host[self._flip]
        self._flip ^= 1
        host = buffer[:size]
        host.copy_(chosen, non_blocking=True)
        if ready is not None:
            ready.record()
        self._deliver()
        self._pending = (ready, host, rows)

    def _deliver(self) -> None:
        """Send each row its token from the step launched last (waiting for it if needed)."""
        if self._pending is None:
            return
        ready, host, rows = self._pending
        self._pending = None
        if ready is not None:
            observers = self._observers
            begun = time.perf_counter() if observers else 0.0
            ready.synchronize()
            for observer in observers:
                observer.waited_for_device(seconds=time.perf_counter() - begun)
        for slot, (row, token) in enumerate(zip(rows, host.tolist(), strict=True)):
            if row is not None and not row.done and not row.stream.cancelled.is_set():
                sequence = self._sequences[slot]
                if sequence is not None and sequence.num_generated < sequence.max_new_tokens:
                    sequence.append_token(token)
                advance_or_fail(row, token, self.eos_id)

    def _release_finished(self) -> None:
        """Free the rows and blocks of requests that ended or were cancelled."""
        for sequence, row in list(self._queued.items()):
            if row.stream.cancelled.is_set():
                del self._queued[sequence]
                self._finish(sequence)
                row.stream.put(None)
        for slot, row in enumerate(self._slots):
            if row is not None and (row.done or row.stream.cancelled.is_set()):
                if not row.done:
                    row.stream.put(None)
                self._free_row(slot)

    def _free_row(self, slot: int, *, cache: bool = True) -> None:
        """Give decode row `slot` and its request's blocks back (`cache`: see `finish`)."""
        sequence = self._sequences[slot]
        if sequence is not None:
            self._finish(sequence, cache=cache)
        self._slots[slot] = None
        self._sequences[slot] = None
        self._decoding[slot] = False
        self.runner.stop_row(slot)
        self.model.tables[slot].fill_(self.model.null_block)
        self._sampler.assign(slot, GREEDY, ())

    def _fail_all(self, error: BaseException, *, locked: bool = False) -> None:
        with contextlib.nullcontext() if locked else self._wake:
            rows = [*self._waiting, *self._queued.values()]
            self._waiting.clear()
        for sequence in list(self._queued):
            self._finish(sequence)
        self._queued.clear()
        self._pending = None
        self._table_writes.clear()
        for slot, row in enumerate(self._slots):
            if row is not None:
                rows.append(row)
                self._free_row(slot, cache=False)  # its last step failed: nothing to share
        for row in rows:
            fail_row(row, error)


def graph_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes captured for an engine of `max_batch` rows."""
    return [s for s in BATCH_SIZES if s < max_batch] + [max_batch]
