"""The fast engine's parts (engine v2), one concept a module.

The bookkeeping is plain Python and imports no torch, so that it is unit-tested on its own:

- `sequence`: one request's state: its status, tokens, block table and counts.
- `blocks`: the block manager: KV memory in fixed-size blocks, reference counts, prefix
  hashes with least-recently-used eviction of unused cached blocks, sliding-window release,
  and the admission ledger that lets a running request never run out of blocks.
- `scheduler`: waiting and running requests; each step, which requests prefill (a chunk of
  their prompt, within a token budget per pass) and which decode (within `max_batch_size`).

The device side (the model runner that owns the KV tensors, buffers and CUDA graphs; the
network and its linear back-ends; the kernels by family) joins this package as its own
modules, reading block tables and slots from the scheduler's output.
"""
