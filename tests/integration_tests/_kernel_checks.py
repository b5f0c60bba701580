"""The fast engine's Triton kernels against torch references, on fresh random inputs.

Run by ``test_kernels.py`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton's interpreter
must be switched on before Triton is imported, which this process-wide setting would do for
every test): ``python -m tests.integration_tests._kernel_checks --seed N [--tiny PATH]
[--only PREFIX] [--skip PREFIX ...]``.
It prints one JSON line per case, ``{"case": name, "metrics": {...}}`` or
``{"case": name, "error": traceback}``; the test asserts on the metrics.

The GPTQ helpers here (`random_gptq`, `dequantize_reference`) are written from the format's
definition, independently of `langchain_synthia._gptq`, and are imported by the tests too.
"""

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

# -- GPTQ from its definition --------------------------------------------------------------------


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 with two's complement wrap-around (as packed int32 words hold bits)."""
    return (((values + 2**31) % 2**32) - 2**31).to(torch.int32)


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``32 / bits`` consecutive entries along `dim` into one int32, first in low bits."""
    pack = 32 // bits
    values = values.to(torch.int64).movedim(dim, -1)
    values = values.reshape(*values.shape[:-1], values.shape[-1] // pack, pack)
    shifts = torch.arange(pack, dtype=torch.int64) * bits
    return _wrap_int32((values << shifts).sum(-1)).movedim(-1, dim).contiguous()


def group_index(k: int, group: int, *, act_order: bool, generator: torch.Generator) -> torch.Tensor:
    """GPTQ's ``g_idx``: with act order, row ``order[i]`` belongs to group ``i // group``."""
    size = k if group == -1 else group
    if not act_order:
        return (torch.arange(k) // size).to(torch.int32)
    order = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // size
    return g_idx.to(torch.int32)


def random_gptq(
    k: int,
    n: int,
    bits: int,
    group: int,
    *,
    generator: torch.Generator,
    g_idx: torch.Tensor | None = None,
    act_order: bool = True,
) -> dict[str, torch.Tensor]:
    """A random GPTQ v1 layer: any code, any stored zero point, positive fp16 scales."""
    levels = 2**bits
    if g_idx is None:
        g_idx = group_index(k, group, act_order=act_order, generator=generator)
    groups = int(g_idx.max()) + 1
    codes = torch.randint(0, levels, (k, n), generator=generator)
    stored_zeros = torch.randint(0, levels, (groups, n), generator=generator)  # zero - 1
    scales = (torch.rand(groups, n, generator=generator) + 0.05) * (0.3 / levels)
    return {
        "qweight": _pack(codes, bits, dim=0),
        "qzeros": _pack(stored_zeros, bits, dim=1),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx,
    }


def dequantize_reference(layer: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """``W[k, n] = scales[g, n] * (code[k, n] - (zero[g, n] + 1))``, ``g = g_idx[k]`` (fp32)."""
    pack, mask = 32 // bits, 2**bits - 1
    qweight, qzeros = layer["qweight"].to(torch.int64), layer["qzeros"].to(torch.int64)
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    rows, cols = torch.arange(k), torch.arange(n)
    code = (qweight[rows // pack] >> (bits * (rows % pack))[:, None]) & mask
    zero = ((qzeros[:, cols // pack] >> (bits * (cols % pack))[None, :]) & mask) + 1
    g = layer["g_idx"].to(torch.int64)
    return layer["scales"][g].float() * (code[:, :].float() - zero[g].float())


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())


# -- the cases -----------------------------------------------------------------------------------

K_IN, N_OUT = 512, 200
"""Linear shapes: K spans several 128-row blocks (split-K), N is not a multiple of the tile."""

LINEAR_CASES = (
    [(bits, group, m, True) for bits in (4, 8) for group in (32, 64, 128, -1) for m in (1, 3, 20)]
    + [(4, 128, m, False) for m in (1, 4, 5, 40, 100)]
    + [(8, 32, 100, True), (4, -1, 100, True)]
)
"""(bits, group size, activation rows, act order): rows <= 4 take the rows kernel, up to 64 the
tiles kernel, more the dequantise-then-matmul path."""

GATED_CASES = [(bits, m) for bits in (4, 8) for m in (1, 3, 20)] + [(4, 100)]
FUSED_CASES = [1, 3, 20, 100]
ATTENTION_CASES = [(8, 2, 64), (8, 2, 128), (4, 4, 64)]
"""(heads, kv heads, head dim)."""
NORM_CASES = [(4096, True, False), (4096, False, False), (200, True, False), (200, False, False)]
NORM_CASES += [(4096, True, True), (200, True, True)]
"""(width, with a residual, x a column slice of a wider buffer as in `FastMistral.decode`)."""


WINDOW_CASES = [(8, 2, 64, window) for window in (1, 7, 100, 160, 5000)] + [(4, 4, 32, 64)]
"""(heads, kv heads, head dim, sliding window) of `decode_attention` with a window, on lengths
1, 100 and 160 (the cache's length): windows smaller than, equal to and larger than them."""
WINDOW_LEN = 160

ROPE_CASES = [(8, 2, 64), (4, 2, 32)]
"""(heads, kv heads, head dim) of `rope_and_cache`."""

GEMV_CASES = [32, 64, 128, 256, -1]
"""Group sizes of the batch-1 GEMV's cases (4-bit, rows in order; -1: one group)."""


def case_names() -> list[str]:
    """Every case's name (importable without Triton, for the test's parametrisation)."""
    return (
        [_linear_name(*c) for c in LINEAR_CASES]
        + [f"gated-{bits}bit-m{m}" for bits, m in GATED_CASES]
        + [f"fused-m{m}" for m in FUSED_CASES]
        + [f"attention-h{h}-kv{kv}-d{d}" for h, kv, d in ATTENTION_CASES]
        + [_window_name(*c) for c in WINDOW_CASES]
        + [_norm_name(*c) for c in NORM_CASES]
        + [f"rope-h{h}-kv{kv}-d{d}" for h, kv, d in ROPE_CASES]
        + [f"gemv-g{group}" for group in GEMV_CASES]
        + [_paged_name(way, *shape) for way, shape in PAGED_CASES.items()]
        + ["model"]
    )


def _window_name(heads: int, kv_heads: int, dim: int, window: int) -> str:
    return f"window-w{window}-h{heads}-kv{kv_heads}-d{dim}"


def _linear_name(bits: int, group: int, m: int, act_order: bool) -> str:
    order = "act" if act_order else "ordered"
    return f"linear-{bits}bit-g{group}-m{m}-{order}"


def _norm_name(n: int, residual: bool, strided: bool) -> str:
    return f"norm-n{n}-{'residual' if residual else 'plain'}{'-strided' if strided else ''}"


def _padded(rows: int, width: int, dtype: torch.dtype, pad: int = 8) -> torch.Tensor:
    """A zeroed ``[rows, width]`` column slice of a wider buffer (as the model's are)."""
    return torch.zeros(rows, width + 2 * pad, dtype=dtype)[:, pad : pad + width]


def check_linear(bits: int, group: int, m: int, act_order: bool, gen: torch.Generator) -> dict:
    from langchain_synthia import _kernels as K
    from langchain_synthia._gptq import pack_gptq

    layer = random_gptq(K_IN, N_OUT, bits, group, generator=gen, act_order=act_order)
    packed = pack_gptq([layer], bits, group)
    x = _padded(m, K_IN, torch.float16)
    x.copy_(torch.randn(m, K_IN, generator=gen))
    out = _padded(m, N_OUT, torch.float32)
    K.gptq_linear(x, packed, out)
    wide = out._base
    outside = torch.cat([wide[:, :8], wide[:, 8 + N_OUT :]], dim=1)
    return {
        "rel_vs_reference": rel(out, K.gptq_linear_reference(x, packed)),
        "rel_vs_definition": rel(out, x.float() @ dequantize_reference(layer, bits)),
        "outside_written": float(outside.abs().max()),
        "has_perm": packed.perm is not None,
    }


def check_gemv(group: int, gen: torch.Generator) -> dict:
    from langchain_synthia import _kernels as K
    from langchain_synthia._gptq import pack_gptq
    from langchain_synthia._kernels import decode_gemv

    n = 512  # a multiple of the GEMV's column tile
    layer = random_gptq(K_IN, n, 4, group, generator=gen, act_order=False)
    packed = pack_gptq([layer], 4, group)
    x = torch.randn(1, K_IN, generator=gen).half()
    out = _padded(1, n, torch.float32)
    K.gemv(x, packed, out)
    wide = out._base
    outside = torch.cat([wide[:, :8], wide[:, 8 + n :]], dim=1)
    # `gemv` runs several steps a program here; the kernel's other path, one step a program
    # (no step ahead), is what the autotuner picks for the GPU's small layers
    step = min(packed.group_size, 128)
    single = torch.zeros(1, n)
    decode_gemv._gemv_kernel.fn[(n // 256, K_IN // step)](
        x, packed.qweight, packed.scales, packed.zeros, single, K_IN, n, GROUP=packed.group_size,
        WORDS=step // 8, HALF2=False, ASM=decode_gemv._WORDS_DOT, BLOCK_N=256, SPLIT=K_IN // step,
        PDL=False,
    )  # fmt: skip
    reference = K.gptq_linear_reference(x, packed)
    return {
        "fits": K.gemv_fits(packed),
        "rel_vs_reference": rel(out, reference),
        "rel_vs_definition": rel(out, x.float() @ dequantize_reference(layer, 4)),
        "rel_one_step_vs_reference": rel(single, reference),
        "outside_written": float(outside.abs().max()),
    }


def check_gated(bits: int, m: int, gen: torch.Generator) -> dict:
    from langchain_synthia import _kernels as K
    from langchain_synthia._gptq import pack_gptq

    layer = random_gptq(K_IN, N_OUT, bits, 32, generator=gen)
    packed = pack_gptq([layer], bits, 32)
    gate_up = _padded(m, 2 * K_IN, torch.float32)  # the fused gate/up output, fp32
    gate_up.copy_(torch.randn(m, 2 * K_IN, generator=gen) * 2)
    out = _padded(m, N_OUT, torch.float32)
    K.gptq_linear(gate_up, packed, out, gated=True)
    gate, up = gate_up[:, :K_IN].half(), gate_up[:, K_IN:].half()
    act = (torch.nn.functional.silu(gate.float()).half() * up).float()
    return {
        "rel_vs_reference": rel(out, K.gptq_linear_reference(act, packed)),
        "rel_vs_definition": rel(out, act.half().float() @ dequantize_reference(layer, bits)),
        "silu_mul_rel": rel(K.silu_mul(gate_up), act),  # the product alone (Marlin's input)
        "silu_mul_fp16_rows": list(K.silu_mul(gate_up).shape) == [m, K_IN],
    }


def check_fused(m: int, gen: torch.Generator) -> dict:
    from langchain_synthia import _kernels as K
    from langchain_synthia._gptq import pack_gptq

    g_idx = group_index(K_IN, 64, act_order=True, generator=gen)
    widths = (N_OUT, 64, 96)
    layers = [random_gptq(K_IN, w, 4, 64, generator=gen, g_idx=g_idx) for w in widths]
    packed = pack_gptq(layers, 4, 64)
    x = torch.randn(m, K_IN, generator=gen).half()
    out = torch.zeros(m, sum(widths))
    K.gptq_linear(x, packed, out)
    errors, column = [], 0
    for layer, width in zip(layers, widths, strict=True):
        ref = x.float() @ dequantize_reference(layer, 4)
        errors.append(rel(out[:, column : column + width], ref))
        column += width
    return {
        "rel_per_layer": errors,
        "splits": list(packed.splits),
        "out_features": packed.out_features,
    }


def check_attention(heads: int, kv_heads: int, dim: int, gen: torch.Generator) -> dict:
    from langchain_synthia import _kernels as K

    batch, cache_rows, max_len = 3, 5, 2100
    lengths = torch.tensor([1, 1000, max_len], dtype=torch.int32)  # 1000: not a block multiple
    perm = torch.randperm(batch, generator=gen)
    lengths = lengths[perm].contiguous()
    q = (torch.randn(batch, heads, dim, generator=gen) * 2).half()
    k_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    v_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    work = K.AttentionWorkspace(batch, heads, kv_heads, dim, max_len, torch.device("cpu"))
    out = torch.full_like(q, float("nan"))
    K.decode_attention(q, k_cache, v_cache, lengths, work, out)
    ref = K.decode_attention_reference(q, k_cache, v_cache, lengths)
    # o_proj's act-order input order: element h * D + d lands in column scatter[h * D + d]
    scatter = torch.randperm(heads * dim, generator=gen).to(torch.int32)
    scattered = torch.full((batch, heads * dim), float("nan"), dtype=torch.float16)
    K.decode_attention(q, k_cache, v_cache, lengths, work, scattered, scatter)
    in_order = torch.empty_like(scattered)
    in_order[:, scatter.long()] = out.reshape(batch, -1)
    # the GQA mapping itself, written out: head h reads kv head h // (heads / kv_heads)
    group = heads // kv_heads
    manual = torch.empty(batch, heads, dim)
    for b in range(batch):
        n = int(lengths[b])
        for h in range(heads):
            keys, values = k_cache[b, :n, h // group].float(), v_cache[b, :n, h // group].float()
            weights = (keys @ q[b, h].float() / math.sqrt(dim)).softmax(0)
            manual[b, h] = weights @ values
    # the tokens of one prompt in another cache row (a prompt's rest after a cached prefix):
    # read together, each up to its own length
    rows = torch.tensor([4, 4, 4], dtype=torch.long)
    routed = torch.full_like(q, float("nan"))
    K.decode_attention(q, k_cache, v_cache, lengths, work, routed, rows=rows)
    routed_ref = K.decode_attention_reference(q, k_cache, v_cache, lengths, rows)
    routed_manual = torch.empty(batch, heads, dim)
    for b in range(batch):
        n, r = int(lengths[b]), int(rows[b])
        for h in range(heads):
            keys, values = k_cache[r, :n, h // group].float(), v_cache[r, :n, h // group].float()
            weights = (keys @ q[b, h].float() / math.sqrt(dim)).softmax(0)
            routed_manual[b, h] = weights @ values
    # fewer, longer key splits (what wide batches use): the same attention
    few = K.AttentionWorkspace(batch, heads, kv_heads, dim, max_len, torch.device("cpu"), splits=4)
    coarse = torch.full_like(q, float("nan"))
    K.decode_attention(q, k_cache, v_cache, lengths, few, coarse)
    return {
        "rel_four_splits_vs_reference": rel(coarse, ref),
        "rel_routed_vs_reference": rel(routed, routed_ref),
        "rel_routed_vs_definition": rel(routed, routed_manual),
        "routed_differs_from_own_rows": rel(routed, out) > 0.1,
        "rel_vs_reference": rel(out, ref),
        "rel_vs_definition": rel(out, manual),
        "rel_per_row": {int(lengths[b]): rel(out[b], manual[b]) for b in range(batch)},
        "finite": bool(torch.isfinite(out).all()),
        "scattered_equal": bool(torch.equal(scattered, in_order)),
    }


def windowed_definition(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
    rows: torch.Tensor, window: int,
) -> torch.Tensor:  # fmt: skip
    """Mistral's sliding-window attention written out: position p sees ``p - window < j <= p``."""
    batch, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        p, r = int(lengths[b]) - 1, int(rows[b])
        seen = [j for j in range(p + 1) if p - window < j]
        for h in range(heads):
            keys = k_cache[r, seen, h // group].float()
            values = v_cache[r, seen, h // group].float()
            out[b, h] = (keys @ q[b, h].float() / math.sqrt(dim)).softmax(0) @ values
    return out


def check_window(heads: int, kv_heads: int, dim: int, window: int, gen: torch.Generator) -> dict:
    """`decode_attention` with a sliding window, each way the engine calls it, against
    `decode_attention_reference` and `windowed_definition`; every rel error by name."""
    from langchain_synthia import _kernels as K
    from langchain_synthia._fast_model import _rotary_tables

    cpu, cache_rows, max_len = torch.device("cpu"), 4, WINDOW_LEN
    k_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    v_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    errors, equal = {}, {}

    def compare(name: str, out: torch.Tensor, ref: torch.Tensor, definition: torch.Tensor) -> None:
        errors[f"{name}_vs_reference"] = rel(out, ref)
        errors[f"{name}_vs_definition"] = rel(out, definition)

    def workspace(batch: int, **options: Any) -> Any:
        return K.AttentionWorkspace(batch, heads, kv_heads, dim, max_len, cpu, window=window,
                                    **options)  # fmt: skip

    # a decode step of 3 rows (lengths 1, 100 and the whole cache), and of 1 row
    lengths = torch.tensor([1, 100, max_len], dtype=torch.int32)
    lengths = lengths[torch.randperm(3, generator=gen)].contiguous()
    q = (torch.randn(3, heads, dim, generator=gen) * 2).half()
    own = torch.arange(3)
    for splits in (None, 4):  # the workspace's own split count, and the few of wide batches
        out = torch.full_like(q, float("nan"))
        K.decode_attention(q, k_cache, v_cache, lengths, workspace(3, splits=splits), out)
        ref = K.decode_attention_reference(q, k_cache, v_cache, lengths, window=window)
        compare(f"batch3_splits{splits}", out, ref,
                windowed_definition(q, k_cache, v_cache, lengths, own, window))  # fmt: skip
    one = slice(lengths.argmax().item(), lengths.argmax().item() + 1)  # the longest row alone
    alone = torch.full_like(q[one], float("nan"))
    one_row = (q[one], k_cache[one], v_cache[one], lengths[one])
    K.decode_attention(*one_row, workspace(1), alone)
    compare("batch1", alone, ref[one], windowed_definition(*one_row, own, window))
    # with rotary: the step's q/k/v projection, rotated and written inside the kernel
    cos, sin = _rotary_tables(10000.0, dim, max_len, cpu)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen) * 2
    lengths = torch.tensor([max_len, 1, 100], dtype=torch.int32)  # batch 1: the longest
    for batch in (1, 3):
        caches = (k_cache.clone(), v_cache.clone())
        rope_q = torch.empty(batch, heads, dim, dtype=torch.float16)
        expected = (k_cache.clone(), v_cache.clone())
        K.rope_and_cache(qkv[:batch], cos, sin, (lengths[:batch] - 1).long(), own[:batch],
                         rope_q, *expected)  # fmt: skip
        out = torch.full((batch, heads, dim), float("nan"), dtype=torch.float16)
        K.decode_attention(qkv[:batch], *caches, lengths[:batch], workspace(batch, splits=8),
                           out, rope=(cos, sin))  # fmt: skip
        ref = K.decode_attention_reference(rope_q, *expected, lengths[:batch], window=window)
        compare(f"rope_batch{batch}", out, ref,
                windowed_definition(rope_q, *expected, lengths[:batch], own, window))  # fmt: skip
        equal[f"rope_batch{batch}_caches_written"] = all(map(torch.equal, caches, expected))
    # a prompt's rest in cache row 2: 21 queries at positions 120..139 and a copy of the last
    # (as a padded suffix step), read together, each up to its own position
    positions = torch.tensor([*range(120, 140), 139])
    rest = (positions + 1).to(torch.int32)
    rows = torch.full((len(positions),), 2, dtype=torch.long)
    q_rest = (torch.randn(len(positions), heads, dim, generator=gen) * 2).half()
    out = torch.full_like(q_rest, float("nan"))
    work = workspace(len(positions), shared_rows=True, splits=8)
    K.decode_attention(q_rest, k_cache, v_cache, rest, work, out, rows=rows)
    ref = K.decode_attention_reference(q_rest, k_cache, v_cache, rest, rows, window)
    compare("rows", out, ref,
            windowed_definition(q_rest, k_cache, v_cache, rest, rows, window))  # fmt: skip
    # queries of one row far apart (not a suffix step's): the last split takes the rest
    spread = torch.tensor([1, 100, max_len, 50], dtype=torch.int32)
    rows = torch.full((4,), 1, dtype=torch.long)
    out = torch.full_like(q_rest[:4], float("nan"))
    K.decode_attention(q_rest[:4], k_cache, v_cache, spread, workspace(4, shared_rows=True),
                       out, rows=rows)  # fmt: skip
    ref = K.decode_attention_reference(q_rest[:4], k_cache, v_cache, spread, rows, window)
    compare("rows_spread", out, ref,
            windowed_definition(q_rest[:4], k_cache, v_cache, spread, rows, window))  # fmt: skip
    windowed = K.decode_attention_reference(q, k_cache, v_cache, lengths, window=window)
    unwindowed = K.decode_attention_reference(q, k_cache, v_cache, lengths)
    return {
        "rel": errors,
        "equal": equal,
        "finite": bool(torch.isfinite(out).all()),
        "window_changes_the_answer": rel(windowed, unwindowed) > 1e-3,
    }


# -- the paged KV cache --------------------------------------------------------------------------

PAGE = 16
"""Positions a block of the paged cases' caches."""

PAGED_CASES = {
    "decode": (8, 2, 64),
    "decode-mha": (4, 4, 32),
    "scatter": (8, 2, 64),
    "rows": (8, 2, 64),
    "rope": (4, 2, 32),
    "window": (8, 2, 64),
    "cache": (4, 2, 32),
}
"""Each way the engine reads or writes a paged cache, and its (heads, kv heads, head dim)."""

PAGED_LENGTHS = [1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5]
"""Keys of a decode step's queries: within a block, a block exactly, into a next, several."""

PAGED_WINDOW = 24
"""The sliding window of the paged window case: less than the longer lengths, not a block."""


def _paged_name(way: str, heads: int, kv_heads: int, dim: int) -> str:
    return f"paged-{way}-h{heads}-kv{kv_heads}-d{dim}"


class PagedPool:
    """Block tables over a shared pool of cache blocks, every slot no row holds NaN.

    Row ``r`` holds positions ``released[r] <= p < longest[r]``: its blocks are dealt from a
    random permutation of the pool, the rows in turn (so they interleave), with spare blocks
    left over. Table entries past a row's blocks are -1, and so are those of blocks wholly
    before ``released[r]`` (given back by the sliding window); one row's last entry instead
    points just past the pool. The pool is a slice of a NaN buffer with one block either side,
    so that a key read through a wrong entry, or at a slot no row holds, makes the output NaN.
    """

    def __init__(
        self, longest: list[int], kv_heads: int, dim: int, gen: torch.Generator,
        released: list[int] | None = None,
    ) -> None:  # fmt: skip
        released = released or [0] * len(longest)
        counts = [-(-n // PAGE) for n in longest]
        total = sum(counts) + 3
        deal = iter(torch.randperm(total, generator=gen).tolist())
        self.tables = torch.full((len(longest), max(counts) + 2), -1, dtype=torch.int32)
        for j in range(max(counts)):
            for r, count in enumerate(counts):
                if j < count:
                    self.tables[r, j] = next(deal)
        self.tables[0, -1] = total  # garbage: the NaN block past the pool
        shape = (total + 2, PAGE, kv_heads, dim)
        self.buffers = [torch.full(shape, float("nan"), dtype=torch.float16) for _ in range(2)]
        self.k_cache, self.v_cache = (buffer[1:-1] for buffer in self.buffers)
        for r, (gone, n) in enumerate(zip(released, longest, strict=True)):
            self.tables[r, : gone // PAGE] = -1
            blocks, offsets = self.where(r, torch.arange(gone // PAGE * PAGE, n))
            for cache in (self.k_cache, self.v_cache):
                keys = torch.randn(len(blocks), kv_heads, dim, generator=gen)
                cache[blocks, offsets] = keys.half()

    @property
    def max_len(self) -> int:
        """The positions a table row can hold."""
        return self.tables.shape[1] * PAGE

    def where(self, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks and offsets of a row's positions."""
        return self.tables[row].long()[positions // PAGE], positions % PAGE

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches as one row a table row, ``[R, max_len, KVH, D]`` (no tables needed)."""
        blocks = self.tables.long().clamp(min=0, max=self.k_cache.shape[0] - 1)
        return tuple(
            cache[blocks].reshape(len(blocks), self.max_len, *cache.shape[2:]).clone()
            for cache in (self.k_cache, self.v_cache)
        )

    def clone(self) -> "PagedPool":
        """The same tables over a copy of the pool."""
        other = object.__new__(PagedPool)
        other.tables = self.tables
        other.buffers = [buffer.clone() for buffer in self.buffers]
        other.k_cache, other.v_cache = (buffer[1:-1] for buffer in other.buffers)
        return other

    def bits_equal(self, other: "PagedPool") -> bool:
        """Whether both pools, their NaN borders included, hold the same bits."""
        return all(
            torch.equal(mine.view(torch.int16), theirs.view(torch.int16))
            for mine, theirs in zip(self.buffers, other.buffers, strict=True)
        )


def check_paged(way: str, heads: int, kv_heads: int, dim: int, gen: torch.Generator) -> dict:
    """`decode_attention` and `rope_and_cache` through block tables (`PagedPool`), one `way`
    the engine calls them, against `decode_attention_reference` with the same tables, and the
    attention against the kernel on the same keys laid out one row a request (no tables)."""
    from langchain_synthia import _kernels as K

    cpu = torch.device("cpu")
    errors: dict[str, float] = {}
    equal: dict[str, bool] = {}
    outputs: list[torch.Tensor] = []

    def workspace(pool: PagedPool, batch: int, splits: int = 8, **options: Any) -> Any:
        """8 key splits (few keys: the interpreter's time goes by programs), or `splits`."""
        return K.AttentionWorkspace(batch, heads, kv_heads, dim, pool.max_len, cpu,
                                    splits=splits, **options)  # fmt: skip

    def attend(name: str, q, pool: PagedPool, lengths, work, rows=None, window=None) -> None:
        out = torch.full_like(q, float("nan"))
        K.decode_attention(q, pool.k_cache, pool.v_cache, lengths, work, out, rows=rows,
                           tables=pool.tables)  # fmt: skip
        ref = K.decode_attention_reference(q, pool.k_cache, pool.v_cache, lengths, rows, window,
                                           pool.tables)  # fmt: skip
        errors[f"{name}_vs_reference"] = rel(out, ref)
        dense = torch.full_like(q, float("nan"))
        K.decode_attention(q, *pool.dense(), lengths, work, dense, rows=rows)
        equal[f"{name}_equals_dense"] = bool(torch.equal(out, dense))
        outputs.append(out)

    lengths = torch.tensor(PAGED_LENGTHS, dtype=torch.int32)
    lengths = lengths[torch.randperm(len(lengths), generator=gen)].contiguous()
    batch = len(lengths)
    q = (torch.randn(batch, heads, dim, generator=gen) * 2).half()
    if way.startswith("decode"):
        pool = PagedPool(lengths.tolist(), kv_heads, dim, gen)
        attend("decode", q, pool, lengths, workspace(pool, batch))
        attend("decode_splits4", q, pool, lengths, workspace(pool, batch, splits=4))
    elif way == "scatter":  # o_proj's act-order input order: h * D + d in column scatter[h * D + d]
        pool = PagedPool(lengths.tolist(), kv_heads, dim, gen)
        work = workspace(pool, batch)
        attend("decode", q, pool, lengths, work)
        scatter = torch.randperm(heads * dim, generator=gen).to(torch.int32)
        scattered = torch.full((batch, heads * dim), float("nan"), dtype=torch.float16)
        K.decode_attention(q, pool.k_cache, pool.v_cache, lengths, work, scattered, scatter,
                           tables=pool.tables)  # fmt: skip
        in_order = torch.empty_like(scattered)
        in_order[:, scatter.long()] = outputs[0].reshape(batch, -1)
        equal["scattered"] = bool(torch.equal(scattered, in_order))
    elif way == "rows":  # one prompt's tokens in table row 2, read together (per_block tiles)
        pool = PagedPool([PAGE + 3, 50, 70, 9], kv_heads, dim, gen)
        rest = torch.arange(30, 71, dtype=torch.int32)  # positions 29..69: blocks 1 to 4
        rest = torch.cat([rest, rest[-1:]])  # a copy of the last, as a padded suffix step
        rows = torch.full((len(rest),), 2, dtype=torch.long)
        q_rest = (torch.randn(len(rest), heads, dim, generator=gen) * 2).half()
        work = workspace(pool, len(rest), shared_rows=True, splits=8)
        attend("rows", q_rest, pool, rest, work, rows)
        spread = torch.tensor([1, PAGE, PAGE + 1, 50], dtype=torch.int32)  # far apart, row 1
        rows = torch.ones(4, dtype=torch.int32)
        attend("rows_spread", q_rest[:4], pool, spread, workspace(pool, 4, shared_rows=True), rows)
    elif way == "rope":
        _paged_rope(heads, kv_heads, dim, lengths, gen, errors, equal, None)
    elif way == "window":
        window = PAGED_WINDOW
        longest = lengths.tolist()
        released = [max(0, n - window) for n in longest]
        pool = PagedPool(longest, kv_heads, dim, gen, released=released)
        equal["blocks_released"] = bool((pool.tables[:, 0] == -1).any())
        for splits in (8, 4):
            work = workspace(pool, batch, window=window, splits=splits)
            attend(f"window_splits{splits}", q, pool, lengths, work, window=window)
        rest = torch.arange(52, 71, dtype=torch.int32)  # positions 51..69 of row 1
        rows = torch.ones(len(rest), dtype=torch.long)
        pool = PagedPool([20, 70], kv_heads, dim, gen, released=[0, 52 - window])
        q_rest = (torch.randn(len(rest), heads, dim, generator=gen) * 2).half()
        work = workspace(pool, len(rest), window=window, shared_rows=True)
        attend("window_rows", q_rest, pool, rest, work, rows, window)
        _paged_rope(heads, kv_heads, dim, lengths, gen, errors, equal, window)
    elif way == "cache":
        _paged_rope_and_cache(heads, kv_heads, dim, gen, errors, equal)
    finite = all(bool(torch.isfinite(out).all()) for out in outputs)
    return {"rel": errors, "equal": equal, "finite": finite}


def _paged_rope(heads, kv_heads, dim, lengths, gen, errors, equal, window) -> None:
    """A decode step's rotary and cache write inside `decode_attention` (`rope`), through the
    tables: batch 1 (reading ahead) and the whole batch, against `rope_and_cache` then
    `decode_attention` (same bits, pools and outputs) and the reference."""
    from langchain_synthia import _kernels as K
    from langchain_synthia._fast_model import _rotary_tables
    from langchain_synthia._kernels import attention

    cpu, prefix = torch.device("cpu"), "" if window is None else "window_"
    longest = lengths.tolist()
    released = None if window is None else [max(0, n - window) for n in longest]
    pool = PagedPool(longest, kv_heads, dim, gen, released=released)
    cos, sin = _rotary_tables(10000.0, dim, pool.max_len, cpu)
    for r, n in enumerate(longest):  # the step's own slot: stale until the step writes it
        blocks, offsets = pool.where(r, torch.tensor([n - 1]))
        pool.k_cache[blocks, offsets] = pool.v_cache[blocks, offsets] = float("nan")
    qkv = torch.randn(len(longest), (heads + 2 * kv_heads) * dim, generator=gen) * 2
    for batch in (1, len(longest)):  # batch 1: the longest row alone
        pick = lengths.argmax()[None] if batch == 1 else torch.arange(batch)
        step_lengths, step_qkv = lengths[pick].contiguous(), qkv[pick].contiguous()
        tables = pool.tables[pick].contiguous()
        splits = None if batch == 1 else 8  # batch 1: the engine's split count
        work = K.AttentionWorkspace(batch, heads, kv_heads, dim, pool.max_len, cpu,
                                    splits=splits, window=window)  # fmt: skip
        fused, apart = pool.clone(), pool.clone()
        one = torch.full((batch, heads, dim), float("nan"), dtype=torch.float16)
        K.decode_attention(step_qkv, fused.k_cache, fused.v_cache, step_lengths, work, one,
                           rope=(cos, sin), tables=tables)  # fmt: skip
        q = torch.empty(batch, heads, dim, dtype=torch.float16)
        K.rope_and_cache(step_qkv, cos, sin, (step_lengths - 1).long(), torch.arange(batch), q,
                         apart.k_cache, apart.v_cache, tables)  # fmt: skip
        two = torch.full((batch, heads, dim), float("nan"), dtype=torch.float16)
        K.decode_attention(q, apart.k_cache, apart.v_cache, step_lengths, work, two,
                           tables=tables)  # fmt: skip
        ref = K.decode_attention_reference(q, apart.k_cache, apart.v_cache, step_lengths,
                                           window=window, tables=tables)  # fmt: skip
        name = f"{prefix}rope_batch{batch}"
        errors[f"{name}_vs_reference"] = rel(one, ref)
        equal[f"{name}_out_equal"] = bool(torch.equal(one, two))
        equal[f"{name}_pools_equal"] = fused.bits_equal(apart)
        equal[f"{name}_pool_written"] = not fused.bits_equal(pool)
        equal[f"{name}_finite"] = bool(torch.isfinite(one).all())
    equal["reads_ahead_at_batch1"] = attention._attention_launch(1, True)["AHEAD"]


def _paged_rope_and_cache(heads, kv_heads, dim, gen, errors, equal) -> None:
    """`rope_and_cache` through the tables, decode-like (one token a row, scattered positions)
    and prefill-like (one row's positions across blocks): exactly the addressed slots change,
    the whole pool compared bit for bit elsewhere."""
    from langchain_synthia import _kernels as K
    from langchain_synthia._fast_model import _rotary_tables

    cpu = torch.device("cpu")
    longest = [1, PAGE, PAGE + 1, 3 * PAGE + 5, 40]
    width = (heads + 2 * kv_heads) * dim
    for kind in ("decode", "prefill"):
        pool = PagedPool(longest, kv_heads, dim, gen)
        cos, sin = _rotary_tables(10000.0, dim, pool.max_len, cpu)
        if kind == "decode":
            rows = torch.tensor([3, 0, 2, 1, 4], dtype=torch.int32)
            positions = torch.tensor([PAGE, 0, PAGE, PAGE - 1, 39])
        else:  # positions 10 ... 52 of row 3: four blocks
            positions = torch.arange(10, 3 * PAGE + 5)
            rows = torch.full((len(positions),), 3, dtype=torch.long)
        tokens = len(positions)
        qkv = _padded(tokens, width, torch.float32)  # a linear layer's fp32 output, sliced
        qkv.copy_(torch.randn(tokens, width, generator=gen) * 2)
        written = pool.clone()
        q_out = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
        K.rope_and_cache(qkv, cos, sin, positions, rows, q_out, written.k_cache,
                         written.v_cache, pool.tables)  # fmt: skip
        h = qkv.half()
        q = h[:, : heads * dim].reshape(tokens, heads, dim)
        k = h[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)
        v = h[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        blocks = pool.tables.long()[rows.long(), positions // PAGE]
        offsets = positions % PAGE
        expected = pool.clone()
        expected.k_cache[blocks, offsets] = K.rotate(k, c, s)
        expected.v_cache[blocks, offsets] = v
        errors[f"{kind}_q_vs_rotate"] = rel(q_out, K.rotate(q, c, s))
        errors[f"{kind}_k_vs_rotate"] = rel(written.k_cache[blocks, offsets], K.rotate(k, c, s))
        equal[f"{kind}_v_written"] = bool(torch.equal(written.v_cache[blocks, offsets], v))
        for other in (written, expected):  # the rotated keys compared above: the rest, bits
            other.k_cache[blocks, offsets] = 0
        equal[f"{kind}_rest_of_pool_untouched"] = written.bits_equal(expected)


def check_norm(n: int, residual: bool, strided: bool, gen: torch.Generator) -> dict:
    from langchain_synthia import _kernels as K

    rows, eps = 3, 1e-5
    weight = (torch.rand(n, generator=gen) + 0.5).half()
    if residual:
        x = _padded(rows, n, torch.float32) if strided else torch.zeros(rows, n)
        x.copy_(torch.randn(rows, n, generator=gen) * 3)  # the fp32 output of a linear layer
        res = torch.randn(rows, n, generator=gen).half()
        updated = (res.float() + x.half().float()).half()
        before = x.clone()
    else:
        x = torch.randn(rows, n, generator=gen).half()
        res, updated, before = None, x.clone(), x.clone()
    out = torch.full((rows, n), float("nan"), dtype=torch.float16)
    x_before, res_before = x.clone(), None if res is None else res.clone()
    K.add_rms_norm(x, res, weight, eps, out)
    ref = K.rms_norm_reference(updated, weight, eps)
    # the next layer's act-order input order: column j is column gather[j] (weight given so)
    gather = torch.randperm(n, generator=gen)
    gathered = torch.full((rows, n), float("nan"), dtype=torch.float16)
    res_again = None if res_before is None else res_before.clone()
    K.add_rms_norm(x_before, res_again, weight[gather], eps, gathered, gather.to(torch.int32))
    h = updated.float()
    definition = weight.float() * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    return {
        "rel_vs_reference": rel(out, ref),
        "rel_vs_definition": rel(out, definition),
        "residual_max_diff": float((res.float() - updated.float()).abs().max()) if residual else 0,
        "input_changed": bool(not torch.equal(x, before)),
        "gathered_equal": bool(torch.equal(gathered, out[:, gather])),
        "gathered_residual_equal": res is None or bool(torch.equal(res_again, res)),
    }


def check_rope(heads: int, kv_heads: int, dim: int, gen: torch.Generator) -> dict:
    """`rope_and_cache` vs `rotate` and indexed cache writes, decode-like and prefill-like."""
    from langchain_synthia import _kernels as K
    from langchain_synthia._fast_model import _rotary_tables

    max_len, cache_rows = 48, 4
    cos, sin = _rotary_tables(10000.0, dim, max_len, torch.device("cpu"))
    width = (heads + 2 * kv_heads) * dim
    results = {}
    for kind in ("decode", "prefill"):
        if kind == "decode":  # one token per cache row, each at its own position
            tokens = 3
            rows = torch.randperm(cache_rows, generator=gen)[:tokens]
            positions = torch.randint(0, max_len, (tokens,), generator=gen)
        else:  # consecutive positions of one row
            tokens = 7
            rows = torch.full((tokens,), 2)
            positions = torch.arange(5, 5 + tokens)
        qkv = _padded(tokens, width, torch.float32)  # a linear layer's fp32 output, sliced
        qkv.copy_(torch.randn(tokens, width, generator=gen) * 2)
        k_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
        v_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        fused = _fused_rope(qkv, cos, sin, positions, rows, k_cache, v_cache, kind, heads)
        h = qkv.half()
        q = h[:, : heads * dim].reshape(tokens, heads, dim)
        k = h[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)
        v = h[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        expected_q = K.rotate(q, c, s)
        expected_k[rows, positions] = K.rotate(k, c, s)
        expected_v[rows, positions] = v
        q_out = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
        K.rope_and_cache(qkv, cos, sin, positions, rows, q_out, k_cache, v_cache)
        results[kind] = {
            "q_rel": rel(q_out, expected_q),
            "k_rel": rel(k_cache, expected_k),
            "v_equal": bool(torch.equal(v_cache, expected_v)),
            "k_elsewhere_equal": bool(
                torch.equal(
                    k_cache.index_put((rows, positions), torch.zeros(1, dtype=torch.float16)),
                    expected_k.index_put((rows, positions), torch.zeros(1, dtype=torch.float16)),
                )
            ),
            **fused,
        }
    return results


def _fused_rope(qkv, cos, sin, positions, rows, k_cache, v_cache, kind: str, heads: int) -> dict:
    """A decode step's way: rotary and cache write inside `decode_attention` (`rope`), against
    `rope_and_cache` then `decode_attention`: the same caches and the same attention. Refused
    with `rows` (one prompt's tokens in one cache row, reading each other's keys)."""
    from langchain_synthia import _kernels as K
    from langchain_synthia._kernels import attention

    tokens, (_, max_len, kv_heads, dim) = qkv.shape[0], k_cache.shape
    lengths = (positions + 1).to(torch.int32)
    if kind == "prefill":
        work = K.AttentionWorkspace(tokens, heads, kv_heads, dim, max_len, torch.device("cpu"),
                                    shared_rows=True)  # fmt: skip
        out = torch.empty(tokens, heads, dim, dtype=torch.float16)
        try:
            K.decode_attention(qkv, k_cache.clone(), v_cache.clone(), lengths, work, out,
                               rows=rows, rope=(cos, sin))  # fmt: skip
        except ValueError as error:
            return {"fused_refused_with_rows": "rope_and_cache" in str(error)}
        return {"fused_refused_with_rows": False}
    rows = torch.arange(tokens)  # token b in cache row b, as a decode step has them
    work = K.AttentionWorkspace(tokens, heads, kv_heads, dim, max_len, torch.device("cpu"))
    two_caches, one_caches = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    q = torch.empty(tokens, heads, dim, dtype=torch.float16)
    K.rope_and_cache(qkv, cos, sin, positions, rows, q, *two_caches)
    two = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(q, *two_caches, lengths, work, two)
    one = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(qkv, *one_caches, lengths, work, one, rope=(cos, sin))
    # a batch-1 step, whose kernel reads its first keys before it waits (`AHEAD`)
    alone = (k_cache.clone(), v_cache.clone())
    work = K.AttentionWorkspace(1, heads, kv_heads, dim, max_len, torch.device("cpu"))
    lone = torch.full((1, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(qkv[:1], *alone, lengths[:1], work, lone, rope=(cos, sin))
    two_lone = torch.full((1, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(q[:1], *two_caches, lengths[:1], work, two_lone)
    row0 = [cache[0] for cache in alone], [cache[0] for cache in two_caches]
    return {
        "fused_out_equal": bool(torch.equal(one, two)),
        "fused_caches_equal": all(map(torch.equal, one_caches, two_caches)),
        "fused_caches_written": not torch.equal(one_caches[0], k_cache),
        "batch1_reads_ahead": attention._attention_launch(1, True)["AHEAD"],
        "fused_batch1_out_equal": bool(torch.equal(lone, two_lone)),
        "fused_batch1_cache_equal": all(map(torch.equal, *row0)),
    }


def _same_choice(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Greedy choices agree, except between near-tied tokens (random weights make ties)."""
    mine, theirs = out.argmax(-1), ref.argmax(-1)
    for row in torch.nonzero(mine != theirs).flatten().tolist():
        gap = (ref[row, theirs[row]] - ref[row, mine[row]]).abs()
        if gap > 1e-2 * ref[row].abs().max():
            return False
    return True


def check_model(tiny: str, gen: torch.Generator) -> dict:
    """The whole network on the kernels vs on the references: prefill, then batched decode.

    The prompts' lengths take each GPTQ path in prefill (matmul, rows, tiles kernels).
    """
    from pathlib import Path

    from langchain_synthia._fast_model import FastMistral

    cpu, lengths = torch.device("cpu"), (70, 3, 9)
    models = [
        FastMistral(Path(tiny), cpu, max_batch=3, max_len=96, use_kernels=kernels)
        for kernels in (False, True)  # the references; the Triton kernels, by the interpreter
    ]
    for model in models:
        model.allocate_kv_rows()
    prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in lengths]
    prefill, decode, agree = [], [], True
    with torch.inference_mode():
        logits = [[m.prefill(slot, p) for slot, p in enumerate(prompts)] for m in models]
        for slot in range(len(prompts)):
            prefill.append(rel(logits[1][slot], logits[0][slot]))
        tokens = torch.stack([x.argmax() for x in logits[0]])
        positions = torch.tensor(lengths)
        for _ in range(3):
            ref, out = (m.decode(len(prompts), tokens, positions) for m in models)
            decode.append([rel(out[row], ref[row]) for row in range(len(prompts))])
            agree &= _same_choice(out, ref)
            tokens, positions = ref.argmax(-1), positions + 1
    return {"rel_prefill": prefill, "rel_decode_per_step_and_row": decode, "argmax_agrees": agree}


def _cases(tiny: str | None) -> dict[str, Callable[[torch.Generator], dict]]:
    cases: dict[str, Callable[[torch.Generator], dict]] = {}
    for c in LINEAR_CASES:
        cases[_linear_name(*c)] = lambda g, c=c: check_linear(*c, g)
    for bits, m in GATED_CASES:
        cases[f"gated-{bits}bit-m{m}"] = lambda g, b=bits, m=m: check_gated(b, m, g)
    for m in FUSED_CASES:
        cases[f"fused-m{m}"] = lambda g, m=m: check_fused(m, g)
    for h, kv, d in ATTENTION_CASES:
        cases[f"attention-h{h}-kv{kv}-d{d}"] = lambda g, c=(h, kv, d): check_attention(*c, g)
    for c in WINDOW_CASES:
        cases[_window_name(*c)] = lambda g, c=c: check_window(*c, g)
    for c in NORM_CASES:
        cases[_norm_name(*c)] = lambda g, c=c: check_norm(*c, g)
    for h, kv, d in ROPE_CASES:
        cases[f"rope-h{h}-kv{kv}-d{d}"] = lambda g, c=(h, kv, d): check_rope(*c, g)
    for group in GEMV_CASES:
        cases[f"gemv-g{group}"] = lambda g, group=group: check_gemv(group, g)
    for way, shape in PAGED_CASES.items():
        cases[_paged_name(way, *shape)] = lambda g, w=way, c=shape: check_paged(w, *c, g)
    if tiny:
        cases["model"] = lambda g: check_model(tiny, g)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tiny", help="tiny checkpoint folder for the whole-model case")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th case from the i-th")
    parser.add_argument("--only", default="", help="run only the cases named with this prefix")
    parser.add_argument(
        "--skip", action="append", default=[], help="leave out the cases named with this prefix"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (before Triton is imported)", file=sys.stderr)
        return 2
    cases = _cases(args.tiny)
    shard, shards = (int(part) for part in args.shard.split("/"))
    for index, (name, check) in enumerate(cases.items()):
        if index % shards != shard or not name.startswith(args.only):
            continue
        if name.startswith(tuple(args.skip)):
            continue
        generator = torch.Generator().manual_seed(args.seed * 1000 + index)
        try:
            line = {"case": name, "metrics": check(generator)}
        except Exception:
            line = {"case": name, "error": traceback.format_exc()}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
