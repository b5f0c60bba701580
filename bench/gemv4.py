"""An experiment kept for the record: our own batch-1 GEMV for 4-bit GPTQ, in Triton.

`bench/kernel_probe.py --rows 1 --impls marlin_sorted gemv4` times it in every configuration
of its `GEMV4` list beside Marlin (docs/benchmarks.md, "Kernel choice, measured"). It lost to
Marlin on three of the four layer shapes of Mistral-7B on an H100, so the engine does not use
it; it lives here, not in the package.

Per group of rows it computes ``scale * (sum(x * code) - zero * sum(x))``, so codes meet the
inputs as small integers: in fp32 (a code becomes a float without an int-to-float instruction:
``0x4B000000 | code`` is 2**23 + code), or with ``half2`` in fp16x2 inline PTX, two products
per instruction (fp16 sums of a word's eight products, then fp32).
"""

import torch
import triton
import triton.language as tl

from langchain_synthia._gptq import PackedLinear

_WORD_DOT = """
{
.reg .b32 k, t, a, b, c, d, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 k, 0x64006400;
lop3.b32 a, $1, 0x000f000f, k, 0xea;
shr.u32 t, $1, 4;
lop3.b32 b, t, 0x000f000f, k, 0xea;
shr.u32 t, $1, 8;
lop3.b32 c, t, 0x000f000f, k, 0xea;
shr.u32 t, $1, 12;
lop3.b32 d, t, 0x000f000f, k, 0xea;
sub.f16x2 a, a, k;
sub.f16x2 b, b, k;
sub.f16x2 c, c, k;
sub.f16x2 d, d, k;
mul.rn.f16x2 acc, a, $2;
fma.rn.f16x2 acc, b, $3, acc;
fma.rn.f16x2 acc, c, $4, acc;
fma.rn.f16x2 acc, d, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
"""
"""One word of eight 4-bit codes (GPTQ's order: row 8p+j in nibble j) times its eight
inputs in fp16x2, summed to fp32; rows 8p+j and 8p+j+4 share a half2."""


@triton.jit
def _pair(rows, j: tl.constexpr):
    """Inputs of rows 8p+j (low half) and 8p+j+4 (high half) as one int32 [words, 1]."""
    low = tl.load(rows + j).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = tl.load(rows + j + 4).to(tl.int16, bitcast=True).to(tl.int32)
    return (low | (high << 16))[:, None]


@triton.jit
def _gemv4_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, N,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """``out += x @ W`` for one row and a 4-bit weight, `BLOCK_K` sorted rows a step.

    Per group: ``scale * (sum(x * code) - zero * sum(x))``, so codes meet the inputs as
    plain small integers. `HALF2` does a word's eight products in fp16x2 inline PTX (two
    per instruction; fp16 sums of eight products, then fp32); otherwise in fp32. Split-K
    programs add into `out` atomically.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8  # words of 4-bit codes a step; GROUPS groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    span = K // SPLIT
    for k0 in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
        words = tl.load(w_ptr + (k0 // 8 + offs_w)[:, None] * N + offs_n[None, :])
        if HALF2:
            rows = x_ptr + k0 + offs_w * 8
            # a word's 8 codes times 8 inputs in fp16x2, summed to fp32 (the engine's PTX)
            dots = tl.inline_asm_elementwise(
                ASM,
                "=f,r,r,r,r,r",
                [words, _pair(rows, 0), _pair(rows, 1), _pair(rows, 2), _pair(rows, 3)],
                dtype=tl.float32, is_pure=True, pack=1,
            )  # fmt: skip
        else:
            dots = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptr + k0 + offs_w * 8 + j).to(tl.float32)
                # 0x4B000000 | code is the fp32 2**23 + code: no int-to-float instruction
                codes = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True)
                codes -= 8388608.0
                dots += codes * xj[:, None]
        xs = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        if GROUPS == 1:
            group = k0 // GROUP
            scale = tl.load(s_ptr + group * N + offs_n).to(tl.float32)
            zero = tl.load(z_ptr + group * N + offs_n).to(tl.float32)
            acc += scale * (tl.sum(dots, axis=0) - zero * tl.sum(xs, axis=0))
        else:
            per: tl.constexpr = WORDS // GROUPS
            sums = tl.sum(tl.reshape(dots, [GROUPS, per, BLOCK_N]), axis=1)
            xsum = tl.sum(tl.reshape(xs, [GROUPS, BLOCK_K // GROUPS]), axis=1)
            groups = k0 // GROUP + tl.arange(0, GROUPS)
            where = groups[:, None] * N + offs_n[None, :]
            scale = tl.load(s_ptr + where).to(tl.float32)
            zero = tl.load(z_ptr + where).to(tl.float32)
            acc += tl.sum(scale * (sums - zero * xsum[:, None]), axis=0)
    tl.atomic_add(out_ptr + offs_n, acc)


def gemv4(
    x: torch.Tensor, layer: PackedLinear, out: torch.Tensor, *,
    block_n: int = 64, block_k: int = 128, split: int = 4, warps: int = 4, stages: int = 2,
    half2: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Add ``x @ W`` (one row, fp32) into `out` ``[1, N]`` (zeroed by the caller).

    `layer`'s words are packed as GPTQ packs them (`kernel_probe.gptq_words`), not in the
    engine's `word_slots` order. For a 4-bit layer whose rows are already in `x`'s order
    (``perm is None``), ``N`` a
    multiple of `block_n` and ``K`` of ``block_k * split``; groups of 32 rows or more that
    divide `block_k` or are whole multiples of it.
    """
    n, k = layer.out_features, layer.in_features
    _gemv4_kernel[(n // block_n, split)](
        x, layer.qweight, layer.scales, layer.zeros, out, k, n,
        GROUP=layer.group_size, GROUPS=max(1, block_k // layer.group_size), BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT=split, HALF2=half2, ASM=_WORD_DOT,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
