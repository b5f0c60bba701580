"""The fast engine's parts (engine v2), one concept a module.

The bookkeeping is plain Python and imports no torch, so that it is unit-tested on its own:

- `sequence`: one request's state: its status, tokens, block table and counts.
- `blocks`: the block manager: KV memory in fixed-size blocks, reference counts, prefix
  hashes with least-recently-used eviction of unused cached blocks, sliding-window release,
  and the admission ledger that lets a running request never run out of blocks.
- `scheduler`: waiting and running requests; each step, which requests prefill (a chunk of
  their prompt, within a token budget per pass) and which decode (within `max_batch_size`).

The fast engine (`langchain_synthia._fast_engine`) does not run on these parts yet: its KV
cache is still one row of ``context_window`` positions per request. They are tested on their
own (tests/unit_tests/test_blocks.py, test_scheduler.py).
"""
