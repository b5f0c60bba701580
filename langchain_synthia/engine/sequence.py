"""One request's state as the scheduler and the block manager see it."""

import enum
import itertools

RELEASED = -1
"""The block-table entry of a block that was released because it fell out of the window."""

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = enum.auto()
    """Queued: holds no blocks yet."""
    PREFILLING = enum.auto()
    """Admitted: its prompt is computed in chunks, one per scheduler step."""
    DECODING = enum.auto()
    """Its whole prompt is computed: it decodes one token per step."""
    FINISHED = enum.auto()
    """Done or cancelled: it holds no blocks."""


class Sequence:
    """A prompt, the tokens generated after it, and where their KV lives.

    Position ``p`` of the sequence keeps its key and value in block ``block_table[p //
    block_size]``, at offset ``p % block_size``. The first `num_released_blocks` entries of the
    table are `RELEASED` (the sliding window moved past them); the table grows by one entry per
    block as positions are computed.
    """

    def __init__(self, token_ids: list[int], max_new_tokens: int) -> None:
        """A request for at most `max_new_tokens` tokens after the prompt `token_ids`.

        Raises:
            ValueError: If the prompt is empty or `max_new_tokens` is below 1.
        """
        if not token_ids:
            msg = "A sequence needs at least one prompt token."
            raise ValueError(msg)
        if max_new_tokens < 1:
            msg = f"max_new_tokens must be at least 1 (got {max_new_tokens})."
            raise ValueError(msg)
        self.id = next(_ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.max_new_tokens = max_new_tokens
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        """Positions whose KV is written, or is written by the step scheduled last."""
        self.num_cached_tokens = 0
        """Prompt tokens found in the prefix cache at admission (not computed again)."""
        self.num_released_blocks = 0
        """Leading blocks given up because the sliding window moved past them."""
        self.num_sealed_blocks = 0
        """Leading blocks whose tokens are hashed (and offered to the prefix cache)."""
        self.last_block_hash = b""
        """The chained hash of block ``num_sealed_blocks - 1`` (empty before the first)."""
        self.peak_blocks = 0
        """The most blocks it may hold at once (set by `Scheduler.submit`)."""

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.id}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"tokens={len(self.token_ids)}, computed={self.num_computed})"
        )

    @property
    def max_len(self) -> int:
        """The prompt plus the most tokens it may generate: positions ``0 ... max_len - 1``."""
        return self.num_prompt_tokens + self.max_new_tokens

    @property
    def num_generated(self) -> int:
        """Tokens generated so far (those recorded with `append_token`)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_held_blocks(self) -> int:
        """Blocks it holds a reference to now."""
        return len(self.block_table) - self.num_released_blocks

    @property
    def is_running(self) -> bool:
        """Admitted and not finished: it holds blocks."""
        return self.status in (SequenceStatus.PREFILLING, SequenceStatus.DECODING)

    def append_token(self, token_id: int) -> None:
        """Record a generated token (its KV is written when it is fed to the next step).

        Raises:
            ValueError: If the sequence already has `max_new_tokens` generated tokens.
        """
        if self.num_generated >= self.max_new_tokens:
            msg = f"{self!r} already generated its max_new_tokens={self.max_new_tokens} tokens."
            raise ValueError(msg)
        self.token_ids.append(token_id)
