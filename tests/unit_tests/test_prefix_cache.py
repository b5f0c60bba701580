"""The prefix KV cache: longest whole-block match, LRU eviction within its token budget."""

import torch

from langchain_synthia._prefix_cache import BLOCK, PrefixCache


def kv(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake per-token cache rows [layers=2, tokens, 1, 1] that remember their token id."""
    rows = torch.tensor(ids, dtype=torch.float32)[None, :, None, None].repeat(2, 1, 1, 1)
    return rows, -rows


def test_longest_whole_block_prefix_is_found_and_leaves_a_token_to_compute() -> None:
    cache = PrefixCache(max_tokens=1000)
    first = list(range(4 * BLOCK + BLOCK // 2))
    cache.store(first, *kv(first))
    assert cache.tokens == 4 * BLOCK  # whole blocks only
    shared = 2 * BLOCK + 3
    second = [*first[:shared], 9999, 9998]
    length, keys, values = cache.longest(second)
    assert length == 2 * BLOCK  # the last whole block inside the shared tokens
    assert torch.equal(keys[0, :, 0, 0], torch.arange(2 * BLOCK, dtype=torch.float32))
    assert torch.equal(values, -keys)
    exact = first[: 4 * BLOCK]
    assert cache.longest(exact)[0] == 3 * BLOCK  # never the whole prompt: one token must remain
    assert cache.longest([5, *first])[0] == 0
    assert (cache.hits, cache.reused_tokens) == (2, 5 * BLOCK)


def test_a_different_block_in_the_middle_stops_the_match_there() -> None:
    cache = PrefixCache(max_tokens=1000)
    first = list(range(6 * BLOCK))
    cache.store(first, *kv(first))
    changed = [*first[: 3 * BLOCK], -1, *first[3 * BLOCK + 1 :], 7]
    assert cache.longest(changed)[0] == 3 * BLOCK  # later blocks equal, but after a change


def test_stored_rows_are_copies() -> None:
    cache = PrefixCache(max_tokens=1000)
    ids = list(range(BLOCK + 1))
    keys, values = kv(ids)
    cache.store(ids, keys, values)
    keys.zero_()
    assert cache.longest([*ids, 7])[1][0, 5, 0, 0] == 5


def test_least_recently_used_prefixes_go_first_within_the_budget() -> None:
    cache = PrefixCache(max_tokens=3 * BLOCK)
    a, b, c = ([n] * BLOCK + [0] for n in (1, 2, 3))
    for ids in (a, b):
        cache.store(ids, *kv(ids))
    assert cache.longest(a)[0] == BLOCK  # a is now the most recent
    cache.store(c, *kv(c))
    cache.store([4] * (2 * BLOCK), *kv([4] * (2 * BLOCK)))
    assert cache.tokens <= 3 * BLOCK
    assert cache.longest(b)[0] == 0  # evicted first
    assert cache.longest([4] * (2 * BLOCK) + [1])[0] == 2 * BLOCK


def test_disabled_or_too_short_stores_nothing() -> None:
    off = PrefixCache(max_tokens=0)
    off.store(list(range(500)), *kv(list(range(500))))
    assert off.tokens == 0
    short = PrefixCache(max_tokens=1000)
    short.store(list(range(BLOCK - 1)), *kv(list(range(BLOCK - 1))))
    assert short.tokens == 0
