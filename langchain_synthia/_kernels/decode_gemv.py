"""The batch-1 decode GEMV: one row times a 4-bit GPTQ weight, on CUDA cores.

* `gemv`: ``out += x @ W`` for one row, for the layers that `gemv_fits`; two words of
  codes at a time times their inputs in fp16x2 through inline PTX (`_WORDS_DOT`) on a
  GPU, in fp32 under Triton's interpreter.
* `gemv_fits`: whether a layer's shape and format suit it.

Its reference is `gptq.gptq_linear_reference`.
"""

from typing import Any

import torch

from langchain_synthia._gptq import PackedLinear
from langchain_synthia._kernels._triton import pdl, short_bench, tl, triton

if triton is not None:
    from langchain_synthia._kernels._triton import after_previous

    _WORD_PRODUCTS = """
    lop3.b32 a, {word}, 0x000f000f, k, 0xea;
    lop3.b32 b, {word}, 0x00f000f0, k, 0xea;
    shr.u32 t, {word}, 8;
    lop3.b32 c, t, 0x000f000f, k, 0xea;
    lop3.b32 d, t, 0x00f000f0, k, 0xea;
    sub.f16x2 a, a, $11;
    fma.rn.f16x2 b, b, s, $12;
    sub.f16x2 c, c, $11;
    fma.rn.f16x2 d, d, s, $12;
    {first}
    fma.rn.f16x2 acc, b, {x1}, acc;
    fma.rn.f16x2 acc, c, {x2}, acc;
    fma.rn.f16x2 acc, d, {x3}, acc;"""
    """One word's eight products (the pairs of slots j and j+4 in a, b, c, d) into `acc`."""

    _WORDS_DOT = (
        """
    {
    .reg .b32 k, s, t, a, b, c, d, acc;
    .reg .b16 lo, hi;
    .reg .f32 flo, fhi;
    mov.b32 k, 0x64006400;
    mov.b32 s, 0x2c002c00;"""
        + _WORD_PRODUCTS.format(
            word="$1", first="mul.rn.f16x2 acc, a, $3;", x1="$4", x2="$5", x3="$6"
        )
        + _WORD_PRODUCTS.format(
            word="$2", first="fma.rn.f16x2 acc, a, $7, acc;", x1="$8", x2="$9", x3="$10"
        )
        + """
    mov.b32 {lo, hi}, acc;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 $0, flo, fhi;
    }
    """
    )
    """Two words of eight 4-bit codes (`word_slots` order) times their sixteen inputs, summed
    in fp16x2 (two products an instruction), then to fp32. ``0x6400 | code`` is the fp16
    1024 + code, so one LOP3 makes two; nibbles 1, 3, 5 and 7 are taken without a shift, as
    1024 + 16 * code, and scaled by 1/16 in the FMA that subtracts the zero point: one shift a
    word. Every step is exact up to the products. Operands: the two words, their input pairs
    (``$3``-``$10``), ``1024 + zero`` and ``-(64 + zero)`` (both halves)."""

    @triton.jit
    def _half2(value):
        """fp16x2 with `value` (fp32, exact in fp16) in both halves, as an int32."""
        bits = value.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return bits | (bits << 16)

    @triton.jit
    def _gemv_step(w_ptr, s_ptr, z_ptr, k0, N, offs_w, offs_n, GROUP: tl.constexpr):
        """Where the step of rows from `k0` keeps its even words, scales and zeros.

        Even words are a ``[WORDS / 2, BLOCK_N]`` tile; the odd words are one row further.
        """
        group = (k0 // GROUP) * N + offs_n
        return (
            w_ptr + (k0 // 8 + offs_w)[:, None] * N + offs_n[None, :],
            s_ptr + group,
            z_ptr + group,
        )

    @triton.jit
    def _step_dots(
        x_ptr, k0, offs_w, even, odd, zero, HALF2: tl.constexpr, ASM: tl.constexpr
    ):  # fmt: skip
        """Per column, ``sum((code - zero) * x)`` over the step's rows.

        `even` and `odd` are the step's even and odd words; word ``w`` holds rows ``8w...8w+7``,
        its slot ``j`` row ``2j`` and slot ``j + 4`` row ``2j + 1`` (`word_slots`), so the
        inputs of slots j and j+4 are the fp16 pair at int32 ``4w + j`` of `x`.
        """
        words = k0 // 8 + offs_w
        if HALF2:
            pairs = x_ptr.to(tl.pointer_type(tl.int32)) + words * 4  # odd words' are 4 on
            products = tl.inline_asm_elementwise(
                ASM, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                [even, odd, tl.load(pairs)[:, None], tl.load(pairs + 1)[:, None],
                 tl.load(pairs + 2)[:, None], tl.load(pairs + 3)[:, None],
                 tl.load(pairs + 4)[:, None], tl.load(pairs + 5)[:, None],
                 tl.load(pairs + 6)[:, None], tl.load(pairs + 7)[:, None],
                 _half2(zero.to(tl.float32) + 1024.0)[None, :],
                 _half2(-(zero.to(tl.float32) + 64.0))[None, :]],
                dtype=tl.float32, is_pure=True, pack=1,
            )  # fmt: skip
        else:  # in fp32: Triton's interpreter (the CPU tests) cannot run inline PTX
            products = tl.zeros(even.shape, dtype=tl.float32)
            rows = x_ptr + words * 8  # an odd word's rows are 8 on
            z = zero.to(tl.float32)[None, :]
            for slot in tl.static_range(8):
                row = 2 * (slot % 4) + slot // 4
                low = tl.load(rows + row).to(tl.float32)[:, None]
                high = tl.load(rows + 8 + row).to(tl.float32)[:, None]
                products += (((even >> (4 * slot)) & 15).to(tl.float32) - z) * low
                products += (((odd >> (4 * slot)) & 15).to(tl.float32) - z) * high
        return tl.sum(products, axis=0)

    def _valid_gemv_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
        """Keep the tiles that divide N and the split-K factors that divide K's groups."""
        n, k, words = named_args["N"], named_args["K"], kwargs["WORDS"]
        return [
            c for c in configs
            if n % c.kwargs["BLOCK_N"] == 0 and k % (8 * words * c.kwargs["SPLIT"]) == 0
        ] or configs[-1:]  # fmt: skip

    _GEMV_CONFIGS = [  # per split-K class, the two fastest timed cold on an H200
        # (a sweep of tiles, splits, warps and register caps): 32 splits for 4,096 inputs (one
        # 128-row step a program), 56 for 14,336 (two); last, one that fits every layer
        triton.Config({"BLOCK_N": block_n, "SPLIT": split}, num_warps=warps, maxnreg=regs)
        for block_n, split, warps, regs in (
            (512, 32, 4, 168), (1024, 32, 8, 128), (512, 56, 4, 128), (1024, 56, 8, None),
            (256, 1, 4, None),
        )
    ]  # fmt: skip

    @triton.autotune(
        configs=_GEMV_CONFIGS,
        key=["N", "K", "GROUP"],
        prune_configs_by={"early_config_prune": _valid_gemv_configs},
        reset_to_zero=["out_ptr"],
        do_bench=short_bench,
        cache_results=True,
    )
    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K: tl.constexpr, N,
        GROUP: tl.constexpr, WORDS: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """``out += x @ W`` for one row of a 4-bit weight: `gemv`.

        Each thread owns whole columns, so nothing is reduced across threads: a step is one
        group of rows (at most 128), its `WORDS` words of codes loaded as two ``[WORDS / 2,
        BLOCK_N]`` tiles (even and odd words), two words at a time times their inputs in fp16x2
        (`HALF2`: `_WORDS_DOT`; in fp32 otherwise, which Triton's interpreter runs), then
        ``scale * dots`` per column. Split-K programs add atomically, relaxed: the kernel
        after reads the sums only once this one has finished. The weights of a step are
        loaded a step ahead, the first step's before the kernel waits for the one before it
        (`after_previous`): weights never change, so under PDL their loads overlap the
        previous kernel's end; only the input `x` has to wait. A program of one step (`K` is a
        constant, so that is known when compiling) holds no registers for a step ahead.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, WORDS // 2) * 2
        span: tl.constexpr = K // SPLIT
        step: tl.constexpr = WORDS * 8
        first = pid_k * span
        end = first + span
        at_words, at_scale, at_zero = _gemv_step(
            w_ptr, s_ptr, z_ptr, first, N, offs_w, offs_n, GROUP
        )
        even, odd = tl.load(at_words), tl.load(at_words + N)
        scale, zero = tl.load(at_scale), tl.load(at_zero)
        after_previous(PDL)
        if span == step:
            dots = _step_dots(x_ptr, first, offs_w, even, odd, zero, HALF2, ASM)
            tl.atomic_add(out_ptr + offs_n, scale.to(tl.float32) * dots, sem="relaxed")
            return
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(first, end, step):
            ahead = k0 + step
            more = offs_n * 0 + ahead < end  # a vector: the interpreter takes no scalar mask
            at_words, at_scale, at_zero = _gemv_step(
                w_ptr, s_ptr, z_ptr, ahead, N, offs_w, offs_n, GROUP
            )
            next_even = tl.load(at_words, mask=more[None, :], other=0)
            next_odd = tl.load(at_words + N, mask=more[None, :], other=0)
            next_scale = tl.load(at_scale, mask=more, other=0.0)
            next_zero = tl.load(at_zero, mask=more, other=0.0)
            dots = _step_dots(x_ptr, k0, offs_w, even, odd, zero, HALF2, ASM)
            acc += scale.to(tl.float32) * dots
            even, odd, scale, zero = next_even, next_odd, next_scale, next_zero
        tl.atomic_add(out_ptr + offs_n, acc, sem="relaxed")


def gemv_fits(layer: PackedLinear) -> bool:
    """Whether `gemv` takes `layer`.

    It takes 4-bit weights whose rows are in the input's order, groups of 32 rows or more that
    are whole 128-row steps or divide one, and a multiple of 256 columns.
    """
    group = layer.group_size
    return (
        layer.bits == 4 and layer.perm is None and layer.out_features % 256 == 0
        and group >= 32 and (group % 128 == 0 or 128 % group == 0)
        and layer.in_features % min(group, 128) == 0
    )  # fmt: skip


def gemv(x: torch.Tensor, layer: PackedLinear, out: torch.Tensor) -> torch.Tensor:
    """Add ``x @ W`` for one row (fp32) into `out` ``[1, N]``, which the caller zeroed.

    The batch-1 decode GEMV (`_gemv_kernel`, for layers that `gemv_fits`). `FastMistral`
    races it against Marlin per layer shape at load; on an H200 it wins on all four of
    Mistral-7B's, with weights read from memory as a step reads them (docs/benchmarks.md).
    It sums two words' sixteen products in fp16, so it is a little less exact than Marlin
    (4.7e-4 against 2e-4 relative to the dequantised weight's product on random layers).
    """
    step = min(layer.group_size, 128)
    half2 = x.is_cuda  # Triton's interpreter (the CPU tests) cannot run inline PTX

    def grid(meta: dict) -> tuple[int, int]:
        return (layer.out_features // meta["BLOCK_N"], meta["SPLIT"])

    args = (x, layer.qweight, layer.scales, layer.zeros, out, layer.in_features,
            layer.out_features)  # fmt: skip
    constants = {"GROUP": layer.group_size, "WORDS": step // 8, "HALF2": half2, "ASM": _WORDS_DOT,
                 **pdl(x.device)}  # fmt: skip
    if x.is_cuda:
        _gemv_kernel[grid](*args, **constants)
    else:  # no autotuning under the interpreter
        fixed = {"BLOCK_N": 256, "SPLIT": 2 if layer.in_features % (2 * step) == 0 else 1}
        _gemv_kernel.fn[grid(fixed)](*args, **constants, **fixed)
    return out
