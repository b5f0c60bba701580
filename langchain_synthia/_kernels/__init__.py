"""Triton kernels of the fast engine, each beside the plain-torch reference it must agree with.

* `gptq_linear`: GPTQ int4/int8 (act order, any group size) times activations, fp32 out,
  accumulated with atomics (split-K) into a zeroed buffer. One kernel for a single row
  (CUDA cores, wide loads) and one for several rows (dequantised tiles into tensor cores).
* `decode_attention`: one query token per row against its keys in the paged KV cache,
  lengths and block tables read on the device (CUDA-graph safe), split over the sequence
  (flash-decoding).
* `add_rms_norm`: residual add + RMSNorm in one pass, with transformers' rounding.
* `rope_and_cache`: rotary embedding of q and k, and the k/v write into the cache (prefill;
  a decode step does both inside `decode_attention`).

A layer's KV cache is a pool of blocks, ``[N, S, KVH, D]`` (`N` blocks of `S` positions), and
each sequence has a row of a block table (int32): its position ``p`` is in block
``table[p // S]`` at offset ``p % S``. Without tables, row ``r`` is block ``r``
(`identity_tables`), so a cache ``[R, max_len, KVH, D]`` of one row a request reads as one
block a row.

On Hopper (and newer) GPUs the decode-step kernels launch with programmatic dependent launch
(`pdl`), so that each can start while the kernel before it drains.

Kernels compile on first use (Triton JIT, cached by Triton under ``~/.triton``); nothing is
downloaded. The references run anywhere (the CPU path and the tests use them).

One module a family, each kernel beside its reference: `gptq` (`gptq_linear`, `dense_matmul`,
`scratch_buffer`), `decode_gemv` (`gemv`), `attention` (`decode_attention`), `norms`
(`add_rms_norm`), `rotary` (`rope_and_cache`), `activation` (`silu_mul`); `_triton` holds the
optional Triton import and the programmatic-dependent-launch helpers they share. Their public
names are all here.
"""

from langchain_synthia._kernels._triton import pdl, triton_available
from langchain_synthia._kernels.activation import gated_input, gated_product, silu_mul
from langchain_synthia._kernels.attention import (
    AttentionWorkspace,
    decode_attention,
    decode_attention_reference,
    identity_tables,
)
from langchain_synthia._kernels.decode_gemv import gemv, gemv_fits
from langchain_synthia._kernels.gptq import (
    dense_matmul,
    gptq_linear,
    gptq_linear_reference,
    release_scratch_buffer,
    scratch_buffer,
)
from langchain_synthia._kernels.norms import add_rms_norm, rms_norm_reference
from langchain_synthia._kernels.rotary import rope_and_cache, rotate

__all__ = [
    "AttentionWorkspace",
    "add_rms_norm",
    "decode_attention",
    "decode_attention_reference",
    "dense_matmul",
    "gated_input",
    "gated_product",
    "gemv",
    "gemv_fits",
    "gptq_linear",
    "gptq_linear_reference",
    "identity_tables",
    "pdl",
    "release_scratch_buffer",
    "rms_norm_reference",
    "rope_and_cache",
    "rotate",
    "scratch_buffer",
    "silu_mul",
    "triton_available",
]
