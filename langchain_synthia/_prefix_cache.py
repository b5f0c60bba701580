"""Reusing the KV cache of prompt prefixes that were already processed.

Agents and RAG chains resend the same system message, tool descriptions and documents with every
call. After a prefill, the KV cache of the prompt (cut down to whole blocks of `BLOCK` tokens) is
kept; a later prompt that begins with the same tokens copies that much of it into its cache row
and prefills only the rest. Memory is bounded in tokens; the least recently used prefix goes
first.
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

BLOCK = 16
"""Prefixes are matched and stored in whole blocks of this many tokens. Small blocks leave a
short rest to compute after the reused part (a reusing call's cost grows with that rest)."""


def _block_keys(ids: list[int] | tuple[int, ...], blocks: int) -> list[int]:
    """A key for each whole-block prefix of `ids`: key ``i`` identifies ``ids[: (i+1) * BLOCK]``.

    Each key chains the one before it, so all of them cost one pass over the tokens.
    """
    keys, key = [], 0
    for start in range(0, blocks * BLOCK, BLOCK):
        key = hash((key, tuple(ids[start : start + BLOCK])))
        keys.append(key)
    return keys


@dataclass
class _Entry:
    ids: tuple[int, ...]
    keys: Any
    """``[layers, tokens, kv_heads, head_dim]`` on the device."""
    values: Any
    boundaries: list[int] = field(default_factory=list)


class PrefixCache:
    """An LRU store of KV-cache prefixes, at most `max_tokens` tokens in all."""

    def __init__(self, max_tokens: int) -> None:
        """Keep at most `max_tokens` tokens of prefixes (0 disables the cache)."""
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[int, tuple[int, int]] = {}  # key of a block-aligned prefix -> entry
        self._next_id = 0
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0

    def longest(self, ids: list[int]) -> tuple[int, Any, Any]:
        """The longest stored prefix of `ids` that leaves at least one token to compute.

        Returns ``(length, keys, values)``, or ``(0, None, None)`` when nothing matches.
        """
        if not self._entries:
            return 0, None, None
        keys = _block_keys(ids, (len(ids) - 1) // BLOCK)
        for blocks in range(len(keys), 0, -1):
            found = self._index.get(keys[blocks - 1])
            if found is None:
                continue
            length = blocks * BLOCK
            entry = self._entries[found[0]]
            if list(entry.ids[:length]) != ids[:length]:  # a hash collision
                continue
            self._entries.move_to_end(found[0])
            self.hits += 1
            self.reused_tokens += length
            return length, entry.keys[:, :length], entry.values[:, :length]
        return 0, None, None

    def store(self, ids: list[int], keys: Any, values: Any) -> None:
        """Keep the whole-block part of a processed prompt (`keys`/`values` are copied)."""
        length = len(ids) // BLOCK * BLOCK
        if length == 0 or length > self.max_tokens:
            return
        prefix = tuple(ids[:length])
        boundaries = _block_keys(prefix, length // BLOCK)
        found = self._index.get(boundaries[-1])
        if found is not None and found[1] == length:
            self._entries.move_to_end(found[0])
            return
        entry = _Entry(prefix, keys[:, :length].clone(), values[:, :length].clone(), boundaries)
        entry_id, self._next_id = self._next_id, self._next_id + 1
        for block, key in enumerate(boundaries, start=1):
            self._index[key] = (entry_id, block * BLOCK)
        self._entries[entry_id] = entry
        self.tokens += length
        while self.tokens > self.max_tokens:
            self._evict()

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.tokens -= len(entry.ids)
        for key in entry.boundaries:
            if self._index.get(key, (None,))[0] == entry_id:
                del self._index[key]
