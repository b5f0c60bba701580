"""The fast engine's parts (engine v2), one concept a module.

The bookkeeping is plain Python and imports no torch, so that it is unit-tested on its own:

- `sequence`: one request's state: its status, tokens, block table and counts.
- `blocks`: the block manager: KV memory in fixed-size blocks, reference counts, prefix
  hashes with least-recently-used eviction of unused cached blocks, sliding-window release,
  and the admission ledger that lets a running request never run out of blocks.
- `scheduler`: waiting and running requests; each step, which requests prefill (a chunk of
  their prompt, within a token budget per pass) and which decode (within `max_batch_size`).
- `observer`: `EngineObserver`, the events a serving engine reports (for profiling).

The fast engine (`langchain_synthia._fast_engine.FastEngine`) runs on them; they are also
tested on their own (tests/unit_tests/test_blocks.py, test_scheduler.py).
"""

from langchain_synthia.engine.blocks import Block, BlockManager, block_hash
from langchain_synthia.engine.observer import EngineObserver
from langchain_synthia.engine.scheduler import (
    DecodeToken,
    PrefillChunk,
    ScheduledStep,
    Scheduler,
)
from langchain_synthia.engine.sequence import RELEASED, Sequence, SequenceStatus

__all__ = [
    "RELEASED",
    "Block",
    "BlockManager",
    "DecodeToken",
    "EngineObserver",
    "PrefillChunk",
    "ScheduledStep",
    "Scheduler",
    "Sequence",
    "SequenceStatus",
    "block_hash",
]
