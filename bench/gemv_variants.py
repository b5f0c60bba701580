"""A/B of batch-1 GEMV variants, timed cold on the four Mistral-7B layer shapes.

Each shape is timed as a decode step meets it: one call on each of 32 copies of the layer in
a CUDA graph (`bench/gemv_sweep.py` does the same against Marlin), in every configuration of
`CONFIGS`. Kernels:

* `_orig_kernel`: the GEMV as it landed in 43c8a06, codes in GPTQ's order. ``RELAXED=False``
  is its ``tl.atomic_add`` with Triton's default ordering, which compiles to ``MEMBAR.ALL.GPU;
  ATOMG; CCTL.IVALL`` (a full fence before the split-K add, an L1 invalidation after);
  ``RELAXED=True`` is one fire-and-forget ``REDG``.
* `_paired_kernel`: relaxed, codes in `word_slots` order (a word's nibbles j and j+4 hold rows
  2j and 2j+1, so its fp16x2 pairs are one aligned int32 of the input: 4 loads a word, not 8
  loads and bit twiddling), the zero point subtracted in fp16x2 with the codes' bias (exact,
  so no ``sum(x)`` and no cross-warp reduction a step). `_PAIRED_DOT` does a word at a time,
  `_PAIRED_DOT2` two words summed in fp16x2, `_PAIRED_DOT3` two words with one shift a word
  instead of three (what the engine adopted); ``VEC`` loads a word's four pairs in one 16-byte
  load; ``READ`` does no arithmetic (XOR of the words): what memory alone allows.
* ``engine``: `langchain_synthia._kernels.gemv` as the engine runs it (autotuned, PDL);
* ``streamk``: `_streamk_kernel` (the engine's GEMV as it was in 5492a5a) in every
  configuration of `STREAMK`: classic split-K (``SPLIT`` programs a column tile) or an equal
  run of the work for each of ``WAVES`` programs an SM. Alone it was faster on gate/up
  (``-streamk.json``), but in a decode step the step got slower, so it was reverted
  (docs/benchmarks.md).
* ``sweep``: the engine's kernel cold in every configuration of `SWEEP`, register caps
  (``maxnreg``) included: what the autotuner, which times warm calls, may miss.
  ``-gemv-variants-onestep.json`` also holds ``prefetch``: 9d16b19's `_gemv_kernel` (before
  it knew `K` when compiling, so a program of one step kept registers for a step ahead:
  compiled for sm_90 by Triton 3.9, 255 registers with 512 columns and 4 warps against 96
  now) in every configuration of `CONFIGS`; that copy was removed after its run.
* ``attention`` (not a GEMV): a decode step's attention at batch 1 as three kernels, as in
  9d16b19 (`K.rope_and_cache`, then `K.decode_attention` without ``rope``: the splits and the
  combine) against the engine's two, whose splits rotate q and write the step's k and v
  themselves. (The runs recorded in ``-gemv-variants-attention*.json`` timed 9d16b19's split
  kernel from a verbatim copy; without ``rope`` the engine's runs the same code.)

Round 1 (bench/results/2026-12-02-H200-gemv-variants-round1.json) ran the variants without
PDL (``acq_rel`` ... ``read``), round 2 (``-round2.json``) those with ``_pdl`` and
``paired4``, and the last run (``-streamk.json``) ``norm``, ``streamk`` and ``engine``. Name
variants to run only those.

    python bench/gemv_variants.py [VARIANT ...]   (on a GPU; writes $OUT/gemv_variants.json)
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from gemv4 import _WORD_DOT
from kernel_probe import SHAPES

from bench import _gptq_tensors
from langchain_synthia import _kernels as K
from langchain_synthia._gptq import pack_gptq, pack_rows, sort_rows, unpack_words
from langchain_synthia._kernels import decode_gemv
from langchain_synthia._kernels._triton import after_previous as _after_previous
from langchain_synthia._kernels.decode_gemv import _gemv_step, _step_dots
from langchain_synthia._linear import graph_us

COPIES = 32
CONFIGS = [(512, 32, 4), (512, 32, 8), (1024, 32, 4), (256, 32, 2), (512, 56, 4),
           (512, 28, 8), (256, 56, 4), (512, 16, 8), (256, 16, 4), (512, 16, 4),
           (512, 8, 4), (1024, 8, 4), (512, 4, 4), (256, 8, 4), (512, 14, 4), (512, 28, 4),
           (1024, 16, 8), (1024, 8, 8)]  # fmt: skip

SWEEP = [  # BLOCK_N, SPLIT, warps, maxnreg (None: the compiler's choice) of the engine's kernel
    (block_n, split, warps, regs)
    for block_n, warps in ((256, 2), (256, 4), (512, 4), (512, 8), (1024, 8))
    for split in (8, 16, 32, 56)
    for regs in (None, 168, 128)
]

STREAMK = [  # BLOCK_N, SPLIT (programs a tile; 0: WAVES programs an SM), WAVES, warps
    (512, 32, 0, 4), (256, 32, 0, 2), (1024, 8, 0, 8), (512, 8, 0, 4), (512, 16, 0, 4),
    (512, 56, 0, 4), (512, 28, 0, 4), (256, 56, 0, 4),
    (512, 0, 1, 4), (512, 0, 2, 4), (512, 0, 3, 4), (512, 0, 4, 4), (512, 0, 6, 4),
    (1024, 0, 1, 8), (1024, 0, 2, 8), (1024, 0, 3, 8), (256, 0, 4, 2), (256, 0, 6, 2),
    (256, 0, 8, 2), (256, 0, 4, 4), (1024, 0, 2, 4), (512, 0, 2, 8),
]  # fmt: skip


def _paired_asm(words: int) -> str:
    """`words` words (``$1``...) times their input pairs, three shifts a word, in fp16x2."""
    body = []
    for w in range(words):
        word, x = f"${1 + w}", [f"${1 + words + 4 * w + j}" for j in range(4)]
        body += [f"lop3.b32 a, {word}, 0x000f000f, k, 0xea;"]
        for name, shift in (("b", 4), ("c", 8), ("d", 12)):
            body += [f"shr.u32 t, {word}, {shift};", f"lop3.b32 {name}, t, 0x000f000f, k, 0xea;"]
        body += [f"sub.f16x2 {name}, {name}, ${1 + 5 * words};" for name in "abcd"]
        first = f"mul.rn.f16x2 acc, a, {x[0]};" if w == 0 else f"fma.rn.f16x2 acc, a, {x[0]}, acc;"
        body += [first] + [
            f"fma.rn.f16x2 acc, {n}, {x[j]}, acc;" for j, n in ((1, "b"), (2, "c"), (3, "d"))
        ]
    return "\n".join([
        "{", ".reg .b32 k, t, a, b, c, d, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;",
        "mov.b32 k, 0x64006400;", *body, "mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;",
        "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}",
    ])  # fmt: skip


_PAIRED_DOT = _paired_asm(1)
_PAIRED_DOT2 = _paired_asm(2)
_PAIRED_DOT3 = decode_gemv._WORDS_DOT
"""Two words; nibbles 1 and 5, 3 and 7 taken unshifted (1024 + 16 code) and scaled by 1/16 in
the zero point's FMA: one shift a word instead of three (what the engine adopted)."""


@triton.jit
def _input_pair(x_ptr, row, j: tl.constexpr):
    low = tl.load(x_ptr + row + j).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = tl.load(x_ptr + row + j + 4).to(tl.int16, bitcast=True).to(tl.int32)
    return low | (high << 16)


@triton.jit
def _orig_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, N,
    WORDS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    RELAXED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """The landed `_gemv_kernel` (GROUP 128, fp16x2, no PDL), with the atomic's ordering."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    span = K // SPLIT
    step: tl.constexpr = WORDS * 8
    first = pid_k * span
    end = first + span
    g = (first // 128) * N + offs_n
    words = tl.load(w_ptr + (first // 8 + offs_w)[:, None] * N + offs_n[None, :])
    scale, zero = tl.load(s_ptr + g), tl.load(z_ptr + g)
    _after_previous(PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(first, end, step):
        ahead = k0 + step
        more = offs_n * 0 + ahead < end
        g = (ahead // 128) * N + offs_n
        next_words = tl.load(w_ptr + (ahead // 8 + offs_w)[:, None] * N + offs_n[None, :],
                             mask=more[None, :], other=0)  # fmt: skip
        next_scale = tl.load(s_ptr + g, mask=more, other=0.0)
        next_zero = tl.load(z_ptr + g, mask=more, other=0.0)
        rows = k0 + offs_w * 8
        products = tl.inline_asm_elementwise(
            ASM, "=f,r,r,r,r,r",
            [words, _input_pair(x_ptr, rows, 0)[:, None], _input_pair(x_ptr, rows, 1)[:, None],
             _input_pair(x_ptr, rows, 2)[:, None], _input_pair(x_ptr, rows, 3)[:, None]],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
        dots = tl.sum(products, axis=0)
        xsum = tl.sum(tl.load(x_ptr + k0 + tl.arange(0, step)).to(tl.float32), axis=0)
        acc += scale.to(tl.float32) * (dots - zero.to(tl.float32) * xsum)
        words, scale, zero = next_words, next_scale, next_zero
    if RELAXED:
        tl.atomic_add(out_ptr + offs_n, acc, sem="relaxed")
    else:
        tl.atomic_add(out_ptr + offs_n, acc)


@triton.jit
def _biased_zero(zero):
    """fp16x2 of ``1024 + zero`` in both halves (the codes' bias plus the zero point)."""
    bits = (zero.to(tl.float32) + 1024.0).to(tl.float16).to(tl.int16, bitcast=True)
    bits = bits.to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _biased_zero16(zero):
    """fp16x2 of ``-(64 + zero)`` in both halves."""
    bits = (-(zero.to(tl.float32) + 64.0)).to(tl.float16).to(tl.int16, bitcast=True)
    bits = bits.to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _pairs(at):
    """A word's four input pairs, one 16-byte load (not reordered across the PDL wait)."""
    return tl.inline_asm_elementwise(
        "ld.global.v4.b32 {$0, $1, $2, $3}, [$4];",
        "=r,=r,=r,=r,l",
        [at],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _paired_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, N,
    WORDS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    TWO: tl.constexpr, READ: tl.constexpr, PDL: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    """Paired nibbles: a word's fp16x2 pair j is int32 ``4 * word + j`` of the input."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = WORDS // 2
    offs_w = tl.arange(0, HALF) * 2  # even words; odd words are +1
    span = K // SPLIT
    step: tl.constexpr = WORDS * 8
    first = pid_k * span
    end = first + span
    g = (first // 128) * N + offs_n
    at = w_ptr + (first // 8 + offs_w)[:, None] * N + offs_n[None, :]
    even, odd = tl.load(at), tl.load(at + N)
    scale, zero = tl.load(s_ptr + g), tl.load(z_ptr + g)
    _after_previous(PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(first, end, step):
        ahead = k0 + step
        more1 = offs_n * 0 + ahead < end
        more = more1[None, :]
        g = (ahead // 128) * N + offs_n
        at = w_ptr + (ahead // 8 + offs_w)[:, None] * N + offs_n[None, :]
        next_even = tl.load(at, mask=more, other=0)
        next_odd = tl.load(at + N, mask=more, other=0)
        next_scale = tl.load(s_ptr + g, mask=more1, other=0.0)
        next_zero = tl.load(z_ptr + g, mask=more1, other=0.0)
        if READ:
            dots = tl.sum(even ^ odd, axis=0).to(tl.float32)
        else:
            kz = _biased_zero(zero)[None, :]
            pe = x32 + (k0 // 8 + offs_w) * 4
            po = pe + 4
            if VEC:
                e0, e1, e2, e3 = _pairs(pe)
                o0, o1, o2, o3 = _pairs(po)
                products = tl.inline_asm_elementwise(
                    ASM, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                    [even, odd, e0[:, None], e1[:, None], e2[:, None], e3[:, None],
                     o0[:, None], o1[:, None], o2[:, None], o3[:, None], kz,
                     _biased_zero16(zero)[None, :]],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
                dots = tl.sum(products, axis=0)
            elif TWO:
                products = tl.inline_asm_elementwise(
                    ASM, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                    [even, odd, tl.load(pe)[:, None], tl.load(pe + 1)[:, None],
                     tl.load(pe + 2)[:, None], tl.load(pe + 3)[:, None], tl.load(po)[:, None],
                     tl.load(po + 1)[:, None], tl.load(po + 2)[:, None],
                     tl.load(po + 3)[:, None], kz, _biased_zero16(zero)[None, :]],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
                dots = tl.sum(products, axis=0)
            else:
                pe_products = tl.inline_asm_elementwise(
                    ASM, "=f,r,r,r,r,r,r",
                    [even, tl.load(pe)[:, None], tl.load(pe + 1)[:, None],
                     tl.load(pe + 2)[:, None], tl.load(pe + 3)[:, None], kz],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
                po_products = tl.inline_asm_elementwise(
                    ASM, "=f,r,r,r,r,r,r",
                    [odd, tl.load(po)[:, None], tl.load(po + 1)[:, None],
                     tl.load(po + 2)[:, None], tl.load(po + 3)[:, None], kz],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
                dots = tl.sum(pe_products + po_products, axis=0)
        acc += scale.to(tl.float32) * dots
        even, odd, scale, zero = next_even, next_odd, next_scale, next_zero
    tl.atomic_add(out_ptr + offs_n, acc, sem="relaxed")


@triton.jit
def _old_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, N, eps, gather_ptr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """`_add_rms_norm_kernel` as it landed in 43c8a06 (residual and gather, one row): waits
    first, gathers through a global store and reload."""
    _after_previous(PDL)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float16)
    x = (x.to(tl.float32) + tl.load(residual_ptr + offs).to(tl.float32)).to(tl.float16)
    tl.store(residual_ptr + offs, x)
    h = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    src = tl.load(gather_ptr + offs)
    tl.debug_barrier()
    h = tl.load(residual_ptr + src).to(tl.float32) * scale
    tl.store(out_ptr + offs, (h.to(tl.float16) * tl.load(w_ptr + offs)).to(tl.float16))


@triton.jit
def _streamk_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, N,
    GROUP: tl.constexpr, WORDS: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, WAVES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`langchain_synthia._kernels.gemv`'s kernel as it was in 5492a5a (reverted).

    The work is ``N / BLOCK_N`` column tiles times ``K / (8 * WORDS)`` steps of rows (one
    group, at most 128 rows), numbered step-fastest; each program takes an equal run of
    it (to within one step), adding its sums into `out` atomically (relaxed: the kernel
    after reads them only once this one has finished) at the end of each tile it works
    on. `streamk_grid` launches either ``SPLIT`` programs a tile (classic split-K), or
    ``WAVES`` programs an SM, so that every SM gets the same share of the weights (no
    tail of half-empty SMs).

    Each thread owns whole columns, so nothing is reduced across threads: a step's
    `WORDS` words of codes are loaded as two ``[WORDS / 2, BLOCK_N]`` tiles (even and odd
    words), two words at a time times their inputs in fp16x2 (`HALF2`: `_WORDS_DOT`; in
    fp32 otherwise, which Triton's interpreter runs), then ``scale * dots`` per column.
    The weights of a step are loaded a step ahead, the first step's before the kernel
    waits for the one before it (`_after_previous`): weights never change, so under PDL
    their loads overlap the previous kernel's end; only the input `x` has to wait.
    """
    step: tl.constexpr = WORDS * 8
    steps = K // step  # a tile's steps
    work = (N // BLOCK_N) * steps
    programs = tl.num_programs(0)
    pid = tl.program_id(0)
    begin = (pid * work) // programs
    end = ((pid + 1) * work) // programs
    offs_w = tl.arange(0, WORDS // 2) * 2
    lane = tl.arange(0, BLOCK_N)
    at_words, at_scale, at_zero = _gemv_step(
        w_ptr, s_ptr, z_ptr, (begin % steps) * step, N, offs_w,
        (begin // steps) * BLOCK_N + lane, GROUP,
    )  # fmt: skip
    even, odd = tl.load(at_words), tl.load(at_words + N)
    scale, zero = tl.load(at_scale), tl.load(at_zero)
    _after_previous(PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for item in range(begin, end):
        ahead = item + 1
        more = lane * 0 + ahead < end  # a vector: the interpreter takes no scalar mask
        at_words, at_scale, at_zero = _gemv_step(
            w_ptr, s_ptr, z_ptr, (ahead % steps) * step, N, offs_w,
            (ahead // steps) * BLOCK_N + lane, GROUP,
        )  # fmt: skip
        next_even = tl.load(at_words, mask=more[None, :], other=0)
        next_odd = tl.load(at_words + N, mask=more[None, :], other=0)
        next_scale = tl.load(at_scale, mask=more, other=0.0)
        next_zero = tl.load(at_zero, mask=more, other=0.0)
        k0 = (item % steps) * step
        dots = _step_dots(x_ptr, k0, offs_w, even, odd, zero, HALF2, ASM)
        acc += scale.to(tl.float32) * dots
        if (item % steps == steps - 1) | (ahead == end):  # the tile's or the run's end
            tile = (item // steps) * BLOCK_N
            tl.atomic_add(out_ptr + tile + lane, acc, sem="relaxed")
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        even, odd, scale, zero = next_even, next_odd, next_scale, next_zero


def streamk_grid(layer, meta: dict) -> tuple[int]:
    """Programs of `_streamk_kernel` for `layer` in configuration `meta`."""
    tiles = layer.out_features // meta["BLOCK_N"]
    work = tiles * (layer.in_features // min(layer.group_size, 128))
    if not meta["WAVES"]:
        return (tiles * meta["SPLIT"],)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return (min(work, meta["WAVES"] * sms),)


def norm_ab(results: dict) -> None:
    """The residual add + RMSNorm + gather of a decode step, 64 calls in a graph (PDL)."""
    n = 4096
    x = torch.randn(1, n, device="cuda")
    residual = torch.randn(1, n, device="cuda").half()
    w = torch.rand(n, device="cuda").half()
    gather = torch.randperm(n, device="cuda").to(torch.int32)
    out = torch.empty(1, n, device="cuda").half()

    def old() -> None:
        _old_norm_kernel[(1,)](x, residual, w, out, n, 1e-5, gather, BLOCK=n, PDL=True,
                               launch_pdl=True, num_warps=8)  # fmt: skip

    def new() -> None:
        K.add_rms_norm(x, residual, w, 1e-5, out, gather)

    start = residual.clone()
    old()
    expected = out.clone()
    residual.copy_(start)
    new()
    same = bool(torch.equal(out, expected))
    for name, fn in (("old", old), ("new", new)):
        us = graph_us(lambda fn=fn: [fn() for _ in range(64)], calls=1) / 64
        results[f"norm/{name}"] = round(us, 2)
    results["norm/same_output"] = same
    print(f"norm: old {results['norm/old']} µs, new {results['norm/new']} µs, same {same}")


def attention_ab(results: dict) -> None:
    """A decode step's attention at batch 1, 32 calls (its layers) in a graph with PDL: the
    three kernels of 9d16b19 (rotary and cache write, the splits, the combine) against the
    engine's two (`K.decode_attention` with ``rope``: the splits rotate q and write the step's
    k and v themselves).

    Also tried, on an H200 (``-attention.json``): the combine done by each tile's last split
    to finish (an acq_rel counter), so that a layer's attention is one kernel. Correct, but
    slower in every form: 8.9-27 µs a call with 768 keys and 16-54 µs with 4,096, against
    6.9 and 8.4 µs for the two kernels here (7.4 and 10.5 for the three before): one program
    a KV head reads every split's partial result, where the combine kernel spreads that
    over a program a head."""
    from langchain_synthia._fast_model import _rotary_tables

    heads, kv_heads, dim, max_len = 32, 8, 128, 4096
    gen = torch.Generator(device="cuda").manual_seed(1)
    caches = [
        torch.randn(1, max_len, kv_heads, dim, device="cuda", generator=gen).half()
        for _ in range(2)
    ]
    qkv = torch.randn(1, (heads + 2 * kv_heads) * dim, device="cuda", generator=gen)
    cos, sin = _rotary_tables(10000.0, dim, max_len, torch.device("cuda"))
    q = torch.empty(1, heads, dim, device="cuda").half()
    scatter = torch.randperm(heads * dim, device="cuda", generator=gen).to(torch.int32)
    out = torch.empty(1, heads * dim, device="cuda").half()
    work = K.AttentionWorkspace(1, heads, kv_heads, dim, max_len, torch.device("cuda"))
    rows = torch.zeros(1, dtype=torch.long, device="cuda")
    for length in (768, 4096):
        lengths = torch.tensor([length], dtype=torch.int32, device="cuda")
        positions = (lengths - 1).long()

        def old(positions=positions, lengths=lengths) -> None:  # as in 9d16b19
            K.rope_and_cache(qkv, cos, sin, positions, rows, q, *caches)
            K.decode_attention(q, *caches, lengths, work, out, scatter)

        def new(lengths=lengths) -> None:
            K.decode_attention(qkv, *caches, lengths, work, out, scatter, rope=(cos, sin))

        old()
        expected, cached = out.clone(), [c[0, length - 1].clone() for c in caches]
        reference = K.decode_attention_reference(q, *caches, lengths).reshape(1, -1)
        in_order = torch.empty_like(reference)
        in_order[:, scatter.long()] = reference  # o_proj's order, as `out`
        for name, fn in (("old", old), ("new", new)):
            for c in caches:
                c[0, length - 1] = 0
            out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            same_cache = all(
                torch.equal(c[0, length - 1], e) for c, e in zip(caches, cached, strict=True)
            )
            diff = float((out.float() - expected.float()).abs().max())
            err = float((out.float() - in_order.float()).norm() / in_order.float().norm())
            us = graph_us(lambda fn=fn: [fn() for _ in range(32)], calls=1) / 32
            results[f"attention/{length}/{name}"] = {
                "us": round(us, 2), "max_abs_diff_vs_old": diff, "rel_vs_reference": err,
                "cache_equal": same_cache,
            }  # fmt: skip
            print(f"attention, {length} keys, {name}: {us:.2f} µs, |diff| {diff:.1e}, "
                  f"rel err {err:.1e}, cache equal {same_cache}", flush=True)  # fmt: skip


def sweep(name: str, packed: list, x, out, ref, results: dict) -> None:
    """The engine's `_gemv_kernel` in every `SWEEP` configuration, register caps included."""
    k, n = packed[0].in_features, packed[0].out_features
    timed = []
    for block_n, split, warps, regs in SWEEP:
        if n % block_n or k % (128 * split):
            continue
        caps = {} if regs is None else {"maxnreg": regs}

        def run(q, block_n=block_n, split=split, warps=warps, caps=caps):
            decode_gemv._gemv_kernel.fn[(n // block_n, split)](
                x, q.qweight, q.scales, q.zeros, out, k, n, GROUP=128, WORDS=16, HALF2=True,
                ASM=decode_gemv._WORDS_DOT, BLOCK_N=block_n, SPLIT=split, PDL=True, launch_pdl=True,
                num_warps=warps, **caps,
            )  # fmt: skip

        label = f"n{block_n}/s{split}/w{warps}/r{regs}"
        try:
            out.zero_()
            run(packed[0])
            err = float((out - ref).norm() / ref.norm())
            us = graph_us(lambda r=run, p=packed: [r(q) for q in p], calls=1) / COPIES
        except Exception as error:
            results[f"{name}/sweep/{label}"] = {"error": repr(error)[-300:]}
            print(name, "sweep", label, repr(error)[-300:], flush=True)
            continue
        results[f"{name}/sweep/{label}"] = {"us": round(us, 2), "rel_err": err}
        timed.append((us, label))
    timed.sort()
    print(f"{name:8s} sweep    best: " + ", ".join(f"{lb} {us:.2f}" for us, lb in timed[:6]))


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    base = {"TWO": True, "READ": False, "VEC": False}
    variants = {  # name: kernel, constants, paired codes, PDL
        "acq_rel": (_orig_kernel, {"ASM": _WORD_DOT, "RELAXED": False}, False, False),
        "relaxed": (_orig_kernel, {"ASM": _WORD_DOT, "RELAXED": True}, False, False),
        "paired": (_paired_kernel, {**base, "ASM": _PAIRED_DOT, "TWO": False}, True, False),
        "paired2": (_paired_kernel, {**base, "ASM": _PAIRED_DOT2}, True, False),
        "paired3": (_paired_kernel, {**base, "ASM": _PAIRED_DOT3}, True, False),
        "read": (_paired_kernel, {**base, "ASM": "", "READ": True}, True, False),
        "acq_rel_pdl": (_orig_kernel, {"ASM": _WORD_DOT, "RELAXED": False}, False, True),
        "relaxed_pdl": (_orig_kernel, {"ASM": _WORD_DOT, "RELAXED": True}, False, True),
        "paired3_pdl": (_paired_kernel, {**base, "ASM": _PAIRED_DOT3}, True, True),
        "paired4_pdl": (_paired_kernel, {**base, "ASM": _PAIRED_DOT3, "VEC": True}, True, True),
        "paired4": (_paired_kernel, {**base, "ASM": _PAIRED_DOT3, "VEC": True}, True, False),
        "read_pdl": (_paired_kernel, {**base, "ASM": "", "READ": True}, True, True),
        "engine": (None, {}, True, True),  # `K.gemv` as the engine runs it (autotuned)
        "streamk": ("streamk", {}, True, True),  # `_streamk_kernel` in every STREAMK config
        "sweep": ("sweep", {}, True, True),  # the engine's kernel in every SWEEP config
    }
    chosen = sys.argv[1:] or [*variants, "norm", "attention"]
    if "norm" in chosen:
        norm_ab(results)
    if "attention" in chosen:
        attention_ab(results)
    for name, (k, n) in SHAPES.items() if any(v in chosen for v in variants) else ():
        perm = torch.randperm(k, device="cuda", generator=gen)
        part = {key: v.cuda() for key, v in _gptq_tensors(k, n, 4, 128, perm, gen).items()}
        (part,), _ = sort_rows([part], 4, 128)
        packed = [pack_gptq([part], 4, 128) for _ in range(COPIES)]  # `word_slots` order
        natural = [pack_rows(unpack_words(p.qweight, 4), 4) for p in packed]  # GPTQ's order
        x = torch.randn(1, k, dtype=torch.float16, device="cuda")
        out = torch.zeros(1, n, device="cuda")
        ref = x.float() @ packed[0].dequantize().float()
        packed_words = [p.qweight for p in packed]
        for variant, (kernel, constants, is_paired, pdl) in variants.items():
            if variant not in chosen:
                continue
            timed = []
            if kernel == "sweep":
                sweep(name, packed, x, out, ref, results)
                continue
            if kernel == "streamk":
                for block_n, split, waves, warps in STREAMK:
                    if n % block_n or (not waves and k % (128 * split)):
                        continue
                    meta = {"BLOCK_N": block_n, "SPLIT": split, "WAVES": waves}
                    grid = streamk_grid(packed[0], meta)

                    def run(q, grid=grid, meta=meta, warps=warps):
                        _streamk_kernel[grid](
                            x, q.qweight, q.scales, q.zeros, out, k, n, GROUP=128, WORDS=16,
                            HALF2=True, ASM=decode_gemv._WORDS_DOT, **meta, PDL=True, launch_pdl=True,
                            num_warps=warps,
                        )  # fmt: skip

                    out.zero_()
                    run(packed[0])
                    err = float((out - ref).norm() / ref.norm())
                    us = graph_us(lambda r=run, p=packed: [r(q) for q in p], calls=1) / COPIES
                    label = f"n{block_n}/s{split}/v{waves}/w{warps}"
                    results[f"{name}/{variant}/{label}"] = {"us": round(us, 2), "rel_err": err}
                    timed.append((us, label, err))
                timed.sort()
                best = ", ".join(f"{label} {us:.2f}" for us, label, _ in timed[:4])
                errs = max((e for _, _, e in timed), default=float("nan"))
                print(f"{name:8s} {variant:8s} best: {best}  (max rel err {errs:.1e})", flush=True)
                continue
            if kernel is None:
                out.zero_()
                K.gemv(x, packed[0], out)
                err = float((out - ref).norm() / ref.norm())
                us = graph_us(lambda p=packed: [K.gemv(x, q, out) for q in p], calls=1) / COPIES
                config = decode_gemv._gemv_kernel.best_config
                results[f"{name}/{variant}"] = {"us": round(us, 2), "rel_err": err,
                                                "config": str(config)}  # fmt: skip
                print(f"{name:8s} {variant:8s} {us:.2f} µs, {config} (rel err {err:.1e})")
                continue
            for block_n, split, warps in CONFIGS:
                if n % block_n or k % (128 * split):
                    continue

                def call(i, block_n=block_n, split=split, warps=warps, kernel=kernel,
                         constants=constants, pdl=pdl, p=packed,
                         words=packed_words if is_paired else natural):  # fmt: skip
                    kernel[(n // block_n, split)](
                        x, words[i], p[i].scales, p[i].zeros, out, k, n,
                        WORDS=16, BLOCK_N=block_n, SPLIT=split, num_warps=warps, **constants,
                        PDL=pdl, **({"launch_pdl": True} if pdl else {}),
                    )  # fmt: skip

                label = f"n{block_n}/s{split}/w{warps}"
                try:
                    out.zero_()
                    call(0)
                    err = float((out - ref).norm() / ref.norm())
                    us = graph_us(lambda c=call: [c(i) for i in range(COPIES)], calls=1)
                    us /= COPIES
                except Exception as error:
                    results[f"{name}/{variant}/{label}"] = {"error": repr(error)[-300:]}
                    print(name, variant, label, repr(error)[-300:], flush=True)
                    continue
                results[f"{name}/{variant}/{label}"] = {"us": round(us, 2), "rel_err": err}
                timed.append((us, label, err))
            timed.sort()
            best = ", ".join(f"{label} {us:.2f}" for us, label, _ in timed[:3])
            errs = max((e for _, _, e in timed), default=float("nan"))
            print(f"{name:8s} {variant:8s} best: {best}  (max rel err {errs:.1e})", flush=True)
        del packed, natural, packed_words
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "gemv_variants.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
