"""The scheduler over a block manager: waiting, admission, chunks, cancellation, and invariants."""

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_synthia.engine.blocks import BlockManager
from langchain_synthia.engine.scheduler import ScheduledStep, Scheduler
from langchain_synthia.engine.sequence import RELEASED, Sequence, SequenceStatus

BS = 4


def scheduler(blocks: int, *, window: int | None = None, caching: bool = True, **limits):
    manager = BlockManager(blocks, BS, window=window, prefix_caching=caching)
    return Scheduler(manager, **limits)


def submitted(sched: Scheduler, tokens: list[int], max_new: int) -> Sequence:
    sequence = Sequence(tokens, max_new)
    sched.submit(sequence)
    return sequence


def sample(step: ScheduledStep, token: int = 7) -> None:
    """What the engine does after a step: record the token each request sampled."""
    for chunk in step.prefills:
        if chunk.completes_prompt:
            chunk.sequence.append_token(token)
    for decode in step.decodes:
        if decode.sequence.num_generated < decode.sequence.max_new_tokens:
            decode.sequence.append_token(token)


def test_importing_the_engine_package_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import langchain_synthia.engine\n"
        "import langchain_synthia.engine.blocks, langchain_synthia.engine.scheduler\n"
        "import langchain_synthia.engine.sequence\n"
        "print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_request_prefills_then_decodes_through_its_block_table() -> None:
    sched = scheduler(8)
    sequence = submitted(sched, list(range(6)), 3)
    step = sched.schedule()
    assert [(c.start, c.end, c.completes_prompt) for c in step.prefills] == [(0, 6, True)]
    assert step.decodes == []
    assert step.prefills[0].slots == [sched.blocks.slot(sequence, p) for p in range(6)]
    assert sequence.status is SequenceStatus.DECODING
    sample(step)
    positions = []
    for _ in range(3):
        step = sched.schedule()
        assert step.prefills == []
        (decode,) = step.decodes
        assert decode.slot == sched.blocks.slot(sequence, decode.position)
        positions.append(decode.position)
        sample(step)
    assert positions == [6, 7, 8]  # the last one only if the engine runs a step ahead
    assert sched.schedule().is_empty  # max_len reached: nothing more until it is finished
    sched.finish(sequence)
    assert sequence.status is SequenceStatus.FINISHED
    assert sched.blocks.num_free_blocks == 8
    assert not sched.has_work


def test_a_request_waits_for_blocks_then_runs_when_another_finishes() -> None:
    sched = scheduler(6)
    first = submitted(sched, [1] * 10, 6)  # 16 positions: 4 blocks
    second = submitted(sched, [2] * 10, 6)
    sample(sched.schedule())
    assert sched.running == [first]
    assert sched.waiting == [second]
    for _ in range(2):
        step = sched.schedule()
        assert [d.sequence for d in step.decodes] == [first]  # it never loses a block
        sample(step)
    assert sched.blocks.num_free_blocks == 3  # free now, but promised to `first`
    sched.finish(first)
    step = sched.schedule()
    assert [c.sequence for c in step.prefills] == [second]
    assert second.status is SequenceStatus.DECODING


def test_the_queue_is_first_come_first_served() -> None:
    sched = scheduler(6)
    running = submitted(sched, [1] * 4, 4)  # 2 blocks
    sample(sched.schedule())
    large = submitted(sched, [2] * 13, 4)  # 5 blocks: waits
    small = submitted(sched, [3] * 2, 2)  # 1 block: would fit, but waits its turn
    sched.schedule()
    assert sched.waiting == [large, small]
    sched.finish(running)
    sched.schedule()
    assert sched.running == [large, small]


def test_a_request_that_can_never_fit_is_refused_with_the_numbers() -> None:
    sched = scheduler(4)
    refused = r"12 prompt tokens plus 8 new tokens \(max_tokens\)"
    with pytest.raises(ValueError, match=refused) as error:
        submitted(sched, [1] * 12, 8)
    message = str(error.value)
    assert "5 blocks of 4 tokens (20 tokens)" in message
    assert "holds 4 blocks (16 tokens)" in message
    assert "lower max_tokens" in message
    assert not sched.has_work
    submitted(sched, [1] * 12, 4)  # 16 positions fit exactly


def test_a_window_lets_a_long_request_fit_in_a_window_of_blocks() -> None:
    with pytest.raises(ValueError, match="can never fit"):
        submitted(scheduler(6, max_prefill_tokens=4), [1] * 40, 8)
    sched = scheduler(6, window=8, max_prefill_tokens=4)
    sequence = submitted(sched, [1] * 40, 8)
    while sequence.status is not SequenceStatus.FINISHED:
        sample(sched.schedule())
        assert sequence.num_held_blocks <= 4
        if sequence.num_generated == sequence.max_new_tokens:
            sched.finish(sequence)
    assert sched.blocks.num_free_blocks == 6


def test_released_window_blocks_go_back_to_the_pool_for_others() -> None:
    sched = scheduler(12, window=4, max_prefill_tokens=4)
    sequence = submitted(sched, [1] * 24, 2)
    for _ in range(6):
        sample(sched.schedule())
    assert sequence.block_table[:4] == [RELEASED] * 4
    assert sequence.num_held_blocks == 2
    assert sched.blocks.num_free_blocks == 10


def test_cancelling_a_waiting_request_just_leaves_the_queue() -> None:
    sched = scheduler(4)
    running = submitted(sched, [1] * 8, 8)
    waiting = submitted(sched, [2] * 8, 8)
    sched.schedule()
    sched.finish(waiting)
    assert waiting.status is SequenceStatus.FINISHED
    assert sched.waiting == []
    assert waiting.block_table == []
    sched.finish(running)
    sched.finish(running)  # a second finish (a late cancel) changes nothing
    assert sched.blocks.num_free_blocks == 4
    assert sched.blocks.num_committed_blocks == 0
    assert sched.schedule().is_empty


def test_cancelling_a_prefilling_request_frees_its_blocks() -> None:
    sched = scheduler(8, max_prefill_tokens=4)
    sequence = submitted(sched, [1] * 20, 4)
    sched.schedule()
    assert sequence.status is SequenceStatus.PREFILLING
    sched.finish(sequence)
    assert sched.blocks.num_free_blocks == 8
    assert sched.schedule().is_empty


def test_prefill_passes_keep_to_the_token_budget_and_the_batch_cap() -> None:
    sched = scheduler(64, max_batch_size=3, max_prefill_tokens=8)
    sequences = [submitted(sched, [i] * 6, 2) for i in range(5)]
    step = sched.schedule()
    assert [(c.sequence, c.start, c.end) for c in step.prefills] == [
        (sequences[0], 0, 6), (sequences[1], 0, 2)
    ]  # fmt: skip
    sample(step)
    step = sched.schedule()
    assert [(c.sequence, c.start, c.end) for c in step.prefills] == [
        (sequences[1], 2, 6), (sequences[2], 0, 4)
    ]  # fmt: skip
    assert [d.sequence for d in step.decodes] == [sequences[0]]
    assert len(sched.running) == 3
    assert sched.waiting == sequences[3:]


def test_a_shared_prompt_is_computed_once_and_only_its_rest_is_prefilled() -> None:
    sched = scheduler(16)
    system = list(range(100, 112))
    first = submitted(sched, [*system, 1, 2], 2)
    sample(sched.schedule())
    second = submitted(sched, [*system, 3], 2)
    step = sched.schedule()
    (chunk,) = step.prefills
    assert (chunk.start, chunk.end) == (12, 13)
    assert chunk.block_table[:3] == first.block_table[:3]
    assert second.num_cached_tokens == 12


@pytest.mark.parametrize("failed", [False, True])
def test_a_request_that_ends_with_its_prompt_leaves_it_cached_unless_it_failed(
    failed: bool,
) -> None:
    """A one-token answer ends in the step that computed its prompt, before the next step
    would have sealed its blocks: finishing seals them (not when the step failed)."""
    sched = scheduler(16)
    system = list(range(100, 112))
    first = submitted(sched, [*system, 1, 2], 1)
    sample(sched.schedule())
    sched.finish(first, cache=not failed)
    assert sched.blocks.num_cached_free_blocks == (0 if failed else 3)
    second = submitted(sched, [*system, 3], 2)
    (chunk,) = sched.schedule().prefills
    assert chunk.start == (0 if failed else 12)
    assert second.num_cached_tokens == (0 if failed else 12)


def test_with_caching_off_every_prompt_is_computed_in_full() -> None:
    sched = scheduler(16, caching=False)
    submitted(sched, list(range(13)), 2)
    sample(sched.schedule())
    submitted(sched, list(range(13)), 2)
    (chunk,) = sched.schedule().prefills
    assert chunk.start == 0


def test_a_sequence_is_submitted_once() -> None:
    sched = scheduler(8)
    sequence = submitted(sched, [1], 1)
    with pytest.raises(ValueError, match="submitted before"):
        sched.submit(sequence)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        Sequence([1], 0)


# -- properties: random submit / step / cancel sequences ------------------------------------

PREFIXES = ([], [1, 2, 1, 2, 0], [1, 2, 1, 2, 0, 0, 1, 2, 2])
"""Prompt starts that many requests share, so that prefix hits are frequent."""


class Driver:
    """Plays the engine: runs each step on a model of the KV memory and samples tokens.

    `kv` maps a slot to the tokens its key and value were computed from (the position's
    token and every token before it). `pipelined` records a step's tokens only after the
    next step is scheduled, as the fast engine does.
    """

    def __init__(self, sched: Scheduler, pipelined: bool) -> None:
        self.sched = sched
        self.pipelined = pipelined
        self.kv: dict[int, tuple[int, ...] | None] = {}
        self.sampled: list[Sequence] = []
        self.tables: dict[Sequence, list[int]] = {}
        self.starts: dict[Sequence, int] = {}
        """The first position each sequence computed in the last step (its window's anchor)."""
        self.finished: list[Sequence] = []

    def step(self) -> ScheduledStep:
        step = self.sched.schedule()
        self.starts.clear()
        ended = self.record(self.sampled) if self.pipelined else []  # their tokens feed this step
        for chunk in step.prefills:
            assert 0 < chunk.end - chunk.start <= self.sched.max_prefill_tokens
            for position, slot in zip(range(chunk.start, chunk.end), chunk.slots, strict=True):
                self.write(chunk.sequence, position, slot)
        for decode in step.decodes:
            self.write(decode.sequence, decode.position, decode.slot)
        assert sum(c.end - c.start for c in step.prefills) <= self.sched.max_prefill_tokens
        assert len(self.sched.running) <= self.sched.max_batch_size
        sampled = [c.sequence for c in step.prefills if c.completes_prompt]
        sampled += [d.sequence for d in step.decodes]
        if self.pipelined:
            self.sampled = sampled
        else:
            ended = self.record(sampled)
        for sequence in ended:  # the engine learns of an end after launching the next step
            self.finish(sequence)
        return step

    def write(self, sequence: Sequence, position: int, slot: int) -> None:
        size = self.sched.blocks.block_size
        assert sequence.block_table[position // size] == slot // size != RELEASED
        self.starts.setdefault(sequence, position)
        assert self.sched.blocks.blocks[slot // size].ref_count >= 1
        known = len(sequence.token_ids) > position
        self.kv[slot] = tuple(sequence.token_ids[: position + 1]) if known else None

    def record(self, sequences: list[Sequence]) -> list[Sequence]:
        """Record each sequence's sampled token; return those that reached max_new_tokens."""
        ended = []
        for sequence in sequences:
            if sequence.status is SequenceStatus.FINISHED:
                continue  # cancelled with a step in flight: its token is dropped
            if sequence.num_generated < sequence.max_new_tokens:
                sequence.append_token((len(sequence.token_ids) * 5 + sequence.id) % 3)
                if sequence.num_generated == sequence.max_new_tokens:
                    ended.append(sequence)
        return ended

    def finish(self, sequence: Sequence) -> None:
        self.sched.finish(sequence)
        self.finished.append(sequence)

    def check(self) -> None:
        """The invariants that hold between any two scheduler calls."""
        manager = self.sched.blocks
        size, window = manager.block_size, manager.window
        holders: dict[int, int] = {}
        keepers: dict[int, int] = {}
        credit = 0
        for sequence in self.sched.running:
            table = sequence.block_table
            assert sequence.num_held_blocks <= sequence.peak_blocks
            assert table[: sequence.num_released_blocks] == [RELEASED] * len(
                table[: sequence.num_released_blocks]
            )
            before = self.tables.get(sequence, [])
            for index, block in enumerate(before):  # a running request never loses a block
                if table[index] == block:
                    continue
                assert table[index] == RELEASED  # only the window takes one, once behind it
                assert window is not None
                assert (index + 1) * size + window <= self.starts[sequence]
            self.tables[sequence] = list(table)
            for index in range(sequence.num_released_blocks, len(table)):
                block = table[index]
                holders[block] = holders.get(block, 0) + 1
                keepers[block] = keepers.get(block, 0) + manager.keeps(sequence, index)
            first = sequence.num_released_blocks * size
            for position in range(first, min(sequence.num_computed, len(sequence.token_ids))):
                slot = manager.slot(sequence, position)
                assert self.kv.get(slot) == tuple(sequence.token_ids[: position + 1])
        for block in manager.blocks:
            assert block.ref_count == holders.get(block.block_id, 0)
            assert block.keepers == keepers.get(block.block_id, 0)
            credit += max(0, block.keepers - 1)
        used = sum(block.ref_count > 0 for block in manager.blocks)
        assert manager.num_free_blocks + used == manager.num_blocks  # none leaked or freed twice
        peaks = sum(sequence.peak_blocks for sequence in self.sched.running)
        assert manager.num_committed_blocks == peaks - credit <= manager.num_blocks
        for sequence in self.sched.waiting:
            assert sequence.block_table == []
        for sequence in self.finished:
            assert sequence.status is SequenceStatus.FINISHED
            assert sequence.block_table == []


OPERATIONS = ("submit", "submit", "step", "step", "step", "cancel")
TOKENS = st.integers(0, 2)

PROPERTY_CASES: list[tuple[bool, bool, int]] = []


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    block_size=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(3, 24),
    window=st.one_of(st.none(), st.integers(1, 12)),
    caching=st.booleans(),
    max_batch_size=st.integers(1, 4),
    max_prefill_tokens=st.integers(1, 10),
    pipelined=st.booleans(),
    data=st.data(),
)
def test_random_traffic_keeps_every_invariant_and_everything_finishes(
    block_size: int,
    num_blocks: int,
    window: int | None,
    caching: bool,
    max_batch_size: int,
    max_prefill_tokens: int,
    pipelined: bool,
    data: st.DataObject,
) -> None:
    """Property: whatever requests arrive, step and get cancelled, blocks are never leaked or
    freed twice, reference counts match the holders, no running request loses a block or
    finds a wrong key in one, and every request finishes once the driver keeps stepping."""
    manager = BlockManager(num_blocks, block_size, window=window, prefix_caching=caching)
    sched = Scheduler(manager, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
    driver = Driver(sched, pipelined)
    accepted: list[Sequence] = []
    hits = 0
    for _ in range(data.draw(st.integers(1, 40), label="operations")):
        operation = data.draw(
            st.sampled_from(["submit", "submit", "step", "step", "step", "cancel"])
        )
        if operation == "submit":
            prompt = list(data.draw(st.sampled_from(PREFIXES)))
            prompt += data.draw(
                st.lists(st.integers(0, 2), min_size=1 - len(prompt) // 9, max_size=8)
            )
            sequence = Sequence(prompt, data.draw(st.integers(1, 8), label="max_new_tokens"))
            fits = manager.peak_blocks(sequence.max_len, max_prefill_tokens) <= num_blocks
            if fits:
                sched.submit(sequence)
                accepted.append(sequence)
            else:
                with pytest.raises(ValueError, match="can never fit"):
                    sched.submit(sequence)
        elif operation == "step":
            hits += sum(c.start > 0 and c.start == c.sequence.num_cached_tokens
                        for c in driver.step().prefills)  # fmt: skip
        else:
            live = [s for s in accepted if s.status is not SequenceStatus.FINISHED]
            if live:
                driver.finish(data.draw(st.sampled_from(live), label="cancelled"))
        driver.check()
    bound = sum(s.num_prompt_tokens + s.max_new_tokens + 2 for s in accepted) + 2
    for _ in range(bound):
        if not sched.has_work:
            break
        driver.step()
        driver.check()
    assert not sched.has_work
    assert all(s.status is SequenceStatus.FINISHED for s in accepted)
    assert manager.num_free_blocks == num_blocks
    assert manager.num_committed_blocks == 0
    PROPERTY_CASES.append((window is not None, caching, hits))


def test_the_traffic_property_tried_windows_and_prefix_hits() -> None:
    if not PROPERTY_CASES:
        pytest.skip("run together with the property above")
    assert len(PROPERTY_CASES) >= 250
    assert any(window for window, _, _ in PROPERTY_CASES)
    assert sum(hits > 0 for _, caching, hits in PROPERTY_CASES if caching) >= 30
