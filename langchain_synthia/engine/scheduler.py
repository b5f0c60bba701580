"""The scheduler: which requests prefill and which decode in each step of the engine.

Requests wait in a queue, first come first served, until the block manager's ledger has room
for the most blocks they may ever hold at once (see `BlockManager`); the head of the queue is
never overtaken, so a large request is not starved by smaller ones behind it. A request that
could not fit even in an empty cache is refused at submission. Admitted requests compute their
prompt in chunks (every step's prefill pass holds at most `max_prefill_tokens` prompt tokens),
then decode one token per step until the engine finishes them. No running request is ever
preempted or loses a block: how many decode at once is bounded by the KV memory their tokens
need, and by `max_batch_size`. A block joins the prefix cache at the first step after the one
that computed it, so requests admitted in the same step do not share their new blocks.

An engine step reads: ``step = scheduler.schedule()``; compute ``step.prefills`` (sampling a
first token for each chunk that completes its prompt) and ``step.decodes``; record sampled
tokens with `Sequence.append_token`; call `Scheduler.finish` for each request that ended or was
cancelled. A decode needs only the position of the token it feeds, not its value, so an engine
may schedule the next step before the last one's tokens reach the host.
"""

from collections import deque
from dataclasses import dataclass, field

from langchain_synthia.engine.blocks import BlockManager, require_positive
from langchain_synthia.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions ``start ... end - 1`` of `sequence`, to compute in this step."""

    sequence: Sequence
    start: int
    """Prompt tokens already computed: cached at admission, or by earlier chunks."""
    end: int
    slots: list[int]
    """Where each position's key and value go (see `BlockManager.slot`)."""

    @property
    def token_ids(self) -> list[int]:
        """The tokens to compute."""
        return self.sequence.token_ids[self.start : self.end]

    @property
    def block_table(self) -> list[int]:
        """The sequence's block table (attention reads the earlier positions through it)."""
        return self.sequence.block_table

    @property
    def completes_prompt(self) -> bool:
        """Whether this is the prompt's last chunk: its last logits give the first token."""
        return self.end == self.sequence.num_prompt_tokens


@dataclass(frozen=True)
class DecodeToken:
    """`sequence`'s latest token, at `position`, to feed to this step's decode."""

    sequence: Sequence
    position: int
    slot: int
    """Where its key and value go."""


@dataclass(frozen=True)
class ScheduledStep:
    """What one engine step computes: prefill chunks first, then one decode batch."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[DecodeToken] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to compute."""
        return not self.prefills and not self.decodes


class Scheduler:
    """Admit, order and retire requests over one `BlockManager`. Not thread-safe."""

    def __init__(
        self, blocks: BlockManager, *, max_batch_size: int = 64, max_prefill_tokens: int = 2048
    ) -> None:
        """Schedule over `blocks`, at most `max_batch_size` requests running at once.

        Raises:
            ValueError: If a limit is below 1.
        """
        require_positive(max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: deque[Sequence] = deque()
        self._running: dict[Sequence, None] = {}
        """Admitted sequences, in admission order (a dict: ordered, and O(1) removal)."""

    @property
    def waiting(self) -> list[Sequence]:
        """Queued sequences, first come first."""
        return list(self._waiting)

    @property
    def running(self) -> list[Sequence]:
        """Admitted sequences (prefilling or decoding), in admission order."""
        return list(self._running)

    @property
    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self._waiting or self._running)

    def submit(self, sequence: Sequence) -> None:
        """Queue a new `sequence`.

        Raises:
            ValueError: If it was submitted before, or could never fit: its prompt plus
                max_new_tokens (bounded by the window, if any) need more blocks than the
                whole cache holds. The message names the numbers and the fixes.
        """
        if sequence.status is not SequenceStatus.WAITING or sequence in self._waiting:
            msg = f"{sequence!r} was submitted before."
            raise ValueError(msg)
        sequence.peak_blocks = self.check_fits(sequence.num_prompt_tokens, sequence.max_new_tokens)
        self._waiting.append(sequence)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The peak blocks of a request of `prompt_tokens` and `max_new_tokens`.

        Raises:
            ValueError: If that is more than the whole cache holds; the message names the
                numbers and the fixes.
        """
        blocks = self.blocks
        need = blocks.peak_blocks(prompt_tokens + max_new_tokens, self.max_prefill_tokens)
        if need > blocks.num_blocks:
            window = "" if blocks.window is None else f", under a sliding window of {blocks.window}"
            msg = (
                f"This request can never fit the KV cache: its {prompt_tokens} prompt tokens "
                f"plus {max_new_tokens} new tokens (max_tokens){window} need up to {need} "
                f"blocks of {blocks.block_size} tokens ({need * blocks.block_size} tokens) at "
                f"once, but the whole cache holds {blocks.num_blocks} blocks "
                f"({blocks.num_blocks * blocks.block_size} tokens). Shorten the prompt, lower "
                "max_tokens, or give the KV cache more memory (gpu_memory_utilization, "
                "kv_cache_tokens); see docs/troubleshooting.md."
            )
            raise ValueError(msg)
        return need

    def finish(self, sequence: Sequence, *, cache: bool = True) -> None:
        """Retire `sequence` (done, or cancelled): it leaves the queue or frees its blocks.

        With `cache`, its full computed blocks are offered to the prefix cache first (a request
        that ends in the step that computed its prompt leaves its prompt cached too); pass
        ``cache=False`` when the steps that were to compute them failed. Finishing a finished
        sequence does nothing.
        """
        if sequence.status is SequenceStatus.WAITING:
            if sequence in self._waiting:
                self._waiting.remove(sequence)
        elif sequence.is_running:
            if cache:
                self.blocks.seal(sequence)
            self.blocks.free(sequence)
            del self._running[sequence]
        sequence.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledStep:
        """Plan the next step: one token for every decoding sequence, then prompt chunks.

        Blocks computed by earlier steps are offered to the prefix cache first; then each
        decoding sequence that has positions left gets a slot for its next token; then the
        prefilling sequences continue and waiting ones are admitted, in order, while the
        step's prefill budget, the batch cap and the block ledger allow.
        """
        blocks = self.blocks
        for sequence in self._running:
            blocks.seal(sequence)
        decodes = []
        for sequence in self._running:
            position = sequence.num_computed
            if sequence.status is SequenceStatus.DECODING and position < sequence.max_len:
                blocks.prepare(sequence, position + 1)
                sequence.num_computed += 1
                decodes.append(DecodeToken(sequence, position, blocks.slot(sequence, position)))
        prefills: list[PrefillChunk] = []
        budget = self.max_prefill_tokens
        for sequence in self._running:
            if budget and sequence.status is SequenceStatus.PREFILLING:
                budget -= self._add_chunk(sequence, budget, prefills)
        while budget and self._waiting and len(self._running) < self.max_batch_size:
            sequence = self._waiting[0]
            if not blocks.try_admit(sequence):
                break  # it waits for blocks; so do those behind it
            self._waiting.popleft()
            sequence.status = SequenceStatus.PREFILLING
            self._running[sequence] = None
            budget -= self._add_chunk(sequence, budget, prefills)
        return ScheduledStep(prefills, decodes)

    def _add_chunk(self, sequence: Sequence, budget: int, prefills: list[PrefillChunk]) -> int:
        """Plan up to `budget` more of `sequence`'s prompt; return how many tokens."""
        start = sequence.num_computed
        end = min(sequence.num_prompt_tokens, start + budget)
        self.blocks.prepare(sequence, end)
        slots = [self.blocks.slot(sequence, position) for position in range(start, end)]
        sequence.num_computed = end
        if end == sequence.num_prompt_tokens:
            sequence.status = SequenceStatus.DECODING
        prefills.append(PrefillChunk(sequence, start, end, slots))
        return end - start
