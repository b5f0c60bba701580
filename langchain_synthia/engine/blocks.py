"""The block manager: KV memory in fixed-size blocks, shared by prefix, released by window.

Every block holds the keys and values of `block_size` consecutive positions of one sequence.
A sequence's block table maps its positions to blocks (see `Sequence`).

Prefix caching: once a block is full and computed it is *sealed*: identified by a hash of its
tokens chained to the hash of the block before it, so one hash names a block's tokens and all
the tokens before them. A request admitted later whose prompt starts with the same tokens
takes a reference to that block instead of computing it again (no copy). Only full blocks
are shared and a full block is never written again, so sharing needs no copy-on-write: a
request's own writes always go to blocks it allocated itself. A block whose last holder lets
go keeps its contents and hash and waits, least recently used first, until a fresh block is
needed and no empty block is left; only then is it evicted. Turning `prefix_caching` off
shares and keeps nothing.

Sliding window: a query at position ``n`` attends to at most `window` positions before it, so
once a sequence's next position to compute is ``n``, a block whose positions all lie more than
`window` positions back is released (one position more than the model needs, to be safe under
either reading of the window's edge). A long request thus holds about a window of blocks.

Admission never over-commits. Each admitted request may hold at most `peak_blocks` blocks at
once, and the manager keeps the ledger `num_committed_blocks`: the most blocks all admitted
requests could hold together in the worst case, namely the sum of their peaks less one for
each extra *keeper* of a shared block (a holder that keeps it until it finishes). A holder
that the window will move past gets no such credit: once it lets go of the shared block it
may need a fresh one while the block stays held by the others. A request is admitted only if
the ledger, with it, stays within the pool; so a running request always finds a block when
it needs one, and none is ever preempted. Blocks are counted, not set aside: until they are
needed, they keep serving as cache. The price: admission plans for every request using its
whole `max_new_tokens`, so requests that stop early leave room unused that could have
admitted others sooner (the alternative, admitting on the blocks in use and preempting when
they run out, would evict a running request's blocks).
"""

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from langchain_synthia.engine.sequence import RELEASED, Sequence


def require_positive(**sizes: int) -> None:
    """Raise `ValueError` naming the first of `sizes` that is below 1."""
    for name, value in sizes.items():
        if value < 1:
            msg = f"{name} must be at least 1 (got {value})."
            raise ValueError(msg)


def block_hash(previous: bytes, token_ids: list[int]) -> bytes:
    """The hash of a block of `token_ids` that follows the block hashed `previous`."""
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass(eq=False)
class Block:
    """One block of KV memory and what is known of its contents."""

    block_id: int
    ref_count: int = 0
    """Sequences whose block table holds it."""
    keepers: int = 0
    """Of those, the ones that keep it until they finish (see the admission ledger)."""
    hash: bytes | None = None
    """Set once sealed (full, computed, offered for sharing); None while not cached."""
    token_ids: tuple[int, ...] = ()
    """The tokens it holds, once sealed (checked on a hash match)."""


class BlockManager:
    """Hand out `num_blocks` blocks of `block_size` positions to sequences."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        window: int | None = None,
        prefix_caching: bool = True,
    ) -> None:
        """Manage `num_blocks` blocks (the engine sizes them from the memory it has).

        `window` is the model's sliding window (None: attention sees every position);
        `prefix_caching` False computes every prompt in full and caches nothing.

        Raises:
            ValueError: If a size is below 1.
        """
        require_positive(num_blocks=num_blocks, block_size=block_size,
                         window=1 if window is None else window)  # fmt: skip
        self.block_size = block_size
        self.window = window
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._empty: deque[int] = deque(range(num_blocks))
        """Free blocks that hold nothing to share, handed out first."""
        self._cached: OrderedDict[int, None] = OrderedDict()
        """Free blocks that hold a sealed block, least recently used first."""
        self._by_hash: dict[bytes, int] = {}
        self.num_committed_blocks = 0
        """The most blocks the admitted sequences could hold together (the admission ledger)."""

    @property
    def num_blocks(self) -> int:
        """All blocks."""
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (empty ones and unused cached ones)."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a sealed block (evicted when memory is needed)."""
        return len(self._cached)

    def peak_blocks(self, max_len: int, chunk_tokens: int) -> int:
        """The most blocks a sequence of `max_len` positions holds at once.

        With a window, a step computing up to `chunk_tokens` positions needs the window before
        them as well; without, it is every block of the sequence.
        """
        every = (max_len - 1) // self.block_size + 1
        if self.window is None:
            return every
        return min(every, (self.window + chunk_tokens - 1) // self.block_size + 2)

    def first_needed_block(self, position: int) -> int:
        """The first block a query at `position` or later may still read."""
        if self.window is None:
            return 0
        return max(0, (position - self.window) // self.block_size)

    def keeps(self, sequence: Sequence, index: int) -> bool:
        """Whether `sequence` holds its block `index` until it finishes (no window passes it)."""
        if self.window is None:
            return True
        return index >= self.first_needed_block(sequence.max_len - 1)

    def try_admit(self, sequence: Sequence) -> bool:
        """Give a waiting `sequence` its cached prompt blocks, if the ledger has room for it.

        On success the sequence's table holds the longest run of cached blocks that its
        prompt starts with (leaving at least one prompt token to compute; with a window, only
        the blocks its next position can read), and `num_computed` counts their tokens.
        """
        count, hits, last_hash = self._cached_prefix(sequence)
        first = count - len(hits)
        credit = sum(
            1 for i, block in enumerate(hits, first)
            if block.keepers > 0 and self.keeps(sequence, i)
        )  # fmt: skip
        if self.num_committed_blocks + sequence.peak_blocks - credit > self.num_blocks:
            return False
        self.num_committed_blocks += sequence.peak_blocks - credit
        for i, block in enumerate(hits, first):
            if block.ref_count == 0:
                del self._cached[block.block_id]
            block.ref_count += 1
            block.keepers += self.keeps(sequence, i)
        sequence.block_table = [RELEASED] * first + [block.block_id for block in hits]
        sequence.num_released_blocks = first
        sequence.num_computed = sequence.num_cached_tokens = count * self.block_size
        sequence.num_sealed_blocks = count
        sequence.last_block_hash = last_hash
        return True

    def _cached_prefix(self, sequence: Sequence) -> tuple[int, list[Block], bytes]:
        """How many blocks of `sequence`'s prompt are cached, those it reads, the last hash.

        Without a window every block must be cached and is read; with one, only the blocks
        the next position reads must be (and are returned).
        """
        if not self.prefix_caching:
            return 0, [], b""
        size, ids = self.block_size, sequence.token_ids
        found: list[Block | None] = []
        best, best_hash, run_start, previous = 0, b"", 0, b""
        for i in range((sequence.num_prompt_tokens - 1) // size):
            tokens = ids[i * size : (i + 1) * size]
            previous = block_hash(previous, tokens)
            block_id = self._by_hash.get(previous)
            block = None if block_id is None else self.blocks[block_id]
            if block is None or block.token_ids != tuple(tokens):
                if self.window is None:
                    break
                block, run_start = None, i + 1
            found.append(block)
            if run_start <= self.first_needed_block((i + 1) * size):
                best, best_hash = i + 1, previous
        first = self.first_needed_block(best * size)
        return best, [b for b in found[first:best] if b is not None], best_hash

    def prepare(self, sequence: Sequence, end: int) -> None:
        """Release what the window left behind, then give `sequence` blocks up to `end`.

        Call before computing positions ``sequence.num_computed ... end - 1``.

        Raises:
            RuntimeError: If the ledger was bypassed (a sequence not admitted, or a step
                larger than its peak was planned for).
        """
        first = self.first_needed_block(sequence.num_computed)
        while sequence.num_released_blocks < first:
            index = sequence.num_released_blocks
            self._release(self.blocks[sequence.block_table[index]], keeper=False)
            sequence.block_table[index] = RELEASED
            sequence.num_released_blocks += 1
        while len(sequence.block_table) * self.block_size < end:
            block = self._take()
            block.ref_count = 1
            block.keepers = int(self.keeps(sequence, len(sequence.block_table)))
            sequence.block_table.append(block.block_id)
        if sequence.num_held_blocks > sequence.peak_blocks:
            msg = f"{sequence!r} holds more than its peak of {sequence.peak_blocks} blocks."
            raise RuntimeError(msg)

    def seal(self, sequence: Sequence) -> None:
        """Offer `sequence`'s blocks that are full, computed and whose tokens are known."""
        if not self.prefix_caching:
            return
        size, ids = self.block_size, sequence.token_ids
        known = min(len(ids), sequence.num_computed)
        while (sequence.num_sealed_blocks + 1) * size <= known:
            index = sequence.num_sealed_blocks
            tokens = ids[index * size : (index + 1) * size]
            sequence.last_block_hash = block_hash(sequence.last_block_hash, tokens)
            sequence.num_sealed_blocks += 1
            if index < sequence.num_released_blocks or sequence.last_block_hash in self._by_hash:
                continue  # gone already, or the same tokens are cached in another block
            block = self.blocks[sequence.block_table[index]]
            block.hash, block.token_ids = sequence.last_block_hash, tuple(tokens)
            self._by_hash[block.hash] = block.block_id

    def free(self, sequence: Sequence) -> None:
        """Release every block `sequence` holds and its place in the ledger.

        The last blocks go first, so that a prompt's first blocks, which more requests share,
        are the last of them to be evicted.
        """
        table = sequence.block_table
        for index in range(len(table) - 1, sequence.num_released_blocks - 1, -1):
            self._release(self.blocks[table[index]], keeper=self.keeps(sequence, index))
        self.num_committed_blocks -= sequence.peak_blocks
        sequence.block_table = []
        sequence.num_released_blocks = 0

    def slot(self, sequence: Sequence, position: int) -> int:
        """Where the KV of `sequence`'s `position` goes: ``block_id * block_size + offset``."""
        block_id = sequence.block_table[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    def _take(self) -> Block:
        if self._empty:
            return self.blocks[self._empty.popleft()]
        if not self._cached:
            msg = "No free KV block: the admission ledger was bypassed."
            raise RuntimeError(msg)
        block = self.blocks[self._cached.popitem(last=False)[0]]
        self._by_hash.pop(block.hash or b"", None)
        block.hash, block.token_ids = None, ()
        return block

    def _release(self, block: Block, *, keeper: bool) -> None:
        if keeper:
            if block.keepers >= 2:  # its sharing was credited to the ledger
                self.num_committed_blocks += 1
            block.keepers -= 1
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is None:
            self._empty.append(block.block_id)
        else:
            self._cached[block.block_id] = None
