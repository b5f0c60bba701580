"""The block manager alone: allocation, sharing, reference counts, eviction, the window."""

import pytest

from langchain_synthia.engine.blocks import BlockManager, block_hash
from langchain_synthia.engine.sequence import RELEASED, Sequence

BS = 4


def admitted(manager: BlockManager, tokens: list[int], max_new: int = 4, chunk: int = 64):
    sequence = Sequence(tokens, max_new)
    sequence.peak_blocks = manager.peak_blocks(sequence.max_len, chunk)
    assert manager.try_admit(sequence)
    return sequence


def computed(manager: BlockManager, sequence: Sequence, end: int) -> None:
    """Allocate and count positions up to `end` as computed, as the scheduler does."""
    manager.prepare(sequence, end)
    sequence.num_computed = end


def prefilled(manager: BlockManager, tokens: list[int], max_new: int = 4) -> Sequence:
    sequence = admitted(manager, tokens, max_new)
    computed(manager, sequence, len(tokens))
    manager.seal(sequence)
    return sequence


def cached_tokens(manager: BlockManager, tokens: list[int]) -> int:
    """How many of `tokens` a new request finds cached (it is admitted, then freed)."""
    sequence = admitted(manager, tokens)
    manager.free(sequence)
    return sequence.num_cached_tokens


def used(manager: BlockManager) -> int:
    return sum(block.ref_count > 0 for block in manager.blocks)


def test_allocation_covers_the_positions_and_slots_point_into_the_blocks() -> None:
    manager = BlockManager(8, BS)
    sequence = admitted(manager, list(range(10)))
    assert sequence.block_table == []
    computed(manager, sequence, 10)
    assert len(sequence.block_table) == 3
    assert len(set(sequence.block_table)) == 3
    assert manager.num_free_blocks == 5
    assert used(manager) + manager.num_free_blocks == manager.num_blocks
    for position in range(10):
        block = sequence.block_table[position // BS]
        assert manager.slot(sequence, position) == block * BS + position % BS
    manager.free(sequence)
    assert manager.num_free_blocks == 8
    assert manager.num_committed_blocks == 0


def test_a_request_sharing_a_prompt_prefix_references_the_same_blocks() -> None:
    manager = BlockManager(16, BS)
    first = prefilled(manager, list(range(10)))  # blocks 0-3, 4-7 full; 8-9 partial
    second = admitted(manager, [*range(10), 50, 51])
    assert second.num_cached_tokens == second.num_computed == 8
    assert second.block_table == first.block_table[:2]
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    computed(manager, second, 12)
    manager.seal(second)
    assert second.block_table[2] != first.block_table[2]  # the partial block is its own
    manager.free(first)
    assert [manager.blocks[b].ref_count for b in second.block_table] == [1, 1, 1]
    manager.free(second)
    assert all(block.ref_count == 0 for block in manager.blocks)
    assert manager.num_cached_free_blocks == 3  # the full blocks stay cached, not 8-9


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    manager = BlockManager(16, BS)
    prefilled(manager, list(range(8)))
    again = admitted(manager, list(range(8)))
    assert again.num_computed == 4  # block two is cached, but its last token gives the logits


def test_a_block_is_identified_by_all_tokens_before_it() -> None:
    assert block_hash(b"", [1, 2]) == block_hash(b"", [1, 2])
    assert block_hash(block_hash(b"", [1, 2]), [3, 4]) != block_hash(block_hash(b"", [9]), [3, 4])
    manager = BlockManager(16, BS)
    prefilled(manager, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    other = admitted(manager, [0, 0, 0, 0, 5, 6, 7, 8, 0])  # same second block, other first
    assert other.num_cached_tokens == 0


def test_generated_tokens_are_cached_for_the_next_turn() -> None:
    manager = BlockManager(16, BS)
    first = prefilled(manager, [1, 2, 3, 4, 5, 6])
    for token in (7, 8, 9):
        first.append_token(token)
        computed(manager, first, first.num_computed + 1)
    manager.seal(first)  # positions 0-8 computed, tokens 0-8 known: blocks 0 and 1 full
    manager.free(first)
    turn_two = admitted(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert turn_two.num_cached_tokens == 8


def test_unused_cached_blocks_are_evicted_least_recently_used_and_only_when_needed() -> None:
    manager = BlockManager(6, BS)
    old = prefilled(manager, [1] * 9)  # caches 2 blocks
    old_blocks = old.block_table[:2]
    manager.free(old)
    new = prefilled(manager, [2] * 9)  # caches 2 blocks
    new_blocks = new.block_table[:2]
    manager.free(new)
    assert manager.num_cached_free_blocks == 4
    fresh = admitted(manager, [3] * 8, max_new=1)
    computed(manager, fresh, 8)  # 2 blocks: the 2 empty ones, no eviction
    assert manager.num_cached_free_blocks == 4
    computed(manager, fresh, 9)  # a third: the least recent cached block goes
    assert manager.num_cached_free_blocks == 3
    assert fresh.block_table[2] == old_blocks[1]  # a prompt's last block before its first
    manager.free(fresh)
    recent = admitted(manager, [2] * 9)
    assert recent.num_cached_tokens == 8  # the recent prompt stays whole
    assert recent.block_table == new_blocks
    manager.free(recent)
    assert cached_tokens(manager, [1] * 9) == 4  # only the old prompt's root is left


def test_a_cache_hit_makes_a_block_recently_used_again() -> None:
    manager = BlockManager(5, BS)
    manager.free(prefilled(manager, [1] * 5))
    manager.free(prefilled(manager, [2] * 5))
    manager.free(admitted(manager, [1] * 5))  # touches a's block
    filler = admitted(manager, [9] * 4, max_new=9)
    computed(manager, filler, 13)  # 4 blocks: the 3 empty ones, then one eviction
    manager.free(filler)
    assert cached_tokens(manager, [2] * 5) == 0  # b's block, least recent, went
    assert cached_tokens(manager, [1] * 5) == 4


def test_caching_off_shares_and_keeps_nothing() -> None:
    manager = BlockManager(16, BS, prefix_caching=False)
    first = prefilled(manager, list(range(10)))
    second = admitted(manager, list(range(10)))
    assert second.num_cached_tokens == 0
    manager.free(first)
    manager.free(second)
    assert manager.num_cached_free_blocks == 0
    assert all(block.hash is None for block in manager.blocks)


def test_the_window_releases_blocks_and_bounds_what_a_long_request_holds() -> None:
    window = 8
    manager = BlockManager(8, BS, window=window)
    sequence = admitted(manager, [5] * 40, max_new=24, chunk=4)
    assert sequence.peak_blocks == (window + 4 - 1) // BS + 2 == 4
    for end in range(4, 41, 4):
        computed(manager, sequence, end)
        assert sequence.num_held_blocks <= sequence.peak_blocks
    assert used(manager) == sequence.num_held_blocks
    for index, block in enumerate(sequence.block_table):
        released = (index + 1) * BS + window <= 36  # the last chunk started at position 36
        assert (block == RELEASED) == released
    assert manager.num_cached_free_blocks == 0  # released before their tokens were sealed
    manager.free(sequence)
    assert manager.num_free_blocks == 8


def test_a_windowed_prefix_hit_references_only_the_blocks_the_window_reads() -> None:
    manager = BlockManager(32, BS, window=8)
    first = admitted(manager, list(range(30)), chunk=4)
    for end in range(4, 31, 4):
        manager.seal(first)
        computed(manager, first, min(end, 30))
    manager.seal(first)
    second = admitted(manager, [*range(28), 99, 98], chunk=4)
    assert second.num_cached_tokens == 28
    assert second.num_released_blocks == (28 - 8) // BS
    assert second.block_table[: second.num_released_blocks] == [RELEASED] * 5
    assert second.block_table[5:] == first.block_table[5:7]


def test_admission_plans_for_the_peak_and_credits_kept_shared_blocks() -> None:
    manager = BlockManager(6, BS)
    first = prefilled(manager, list(range(9)), max_new=3)  # peak 3 blocks
    assert manager.num_committed_blocks == 3
    second = Sequence(list(range(9)), 3)
    second.peak_blocks = 3
    third = Sequence([7] * 9, 7)
    third.peak_blocks = manager.peak_blocks(third.max_len, 64)
    assert third.peak_blocks == 4
    assert not manager.try_admit(third)  # 3 + 4 > 6, though 3 blocks are free now
    assert manager.try_admit(second)  # its 2 shared blocks count once: 3 + 3 - 2
    assert manager.num_committed_blocks == 4
    manager.free(first)
    assert manager.num_committed_blocks == 3
    manager.free(second)
    assert manager.num_committed_blocks == 0
    assert manager.try_admit(third)  # cached blocks never stand in admission's way


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="num_blocks must be at least 1"):
        BlockManager(0)
    with pytest.raises(ValueError, match="window must be at least 1"):
        BlockManager(4, window=0)
