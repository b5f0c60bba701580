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
"""

import functools
import math
import os
import threading
from typing import Any

import torch

from langchain_synthia._gptq import PackedLinear

try:  # Triton comes with CUDA builds of PyTorch; the CPU path does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether Triton kernels can run here."""
    return triton is not None


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> dict[str, bool]:
    """Launch options of our decode-step kernels on `device` (each kernel's ``PDL`` constant).

    On Hopper and newer GPUs they use programmatic dependent launch: a kernel may start while
    the one before it drains; it lets the next one start (``gdc_launch_dependents``), then
    waits for the one before's results (``gdc_wait``) before it reads or writes anything they
    may touch (`_after_previous`). In a captured decode step this overlaps each kernel's
    launch, and the GEMVs' weight loads, with the end of the kernels before (H200: batch 1
    404.5-404.9 tok/s against 392.4 without, docs/benchmarks.md). ``SYNTHIA_PDL=0`` turns it
    off.
    """
    if device.type != "cuda" or os.environ.get("SYNTHIA_PDL") == "0":
        return {"PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _hopper_or_newer(index) else {"PDL": False}


# -- references ---------------------------------------------------------------------------------


def gptq_linear_reference(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """``x @ W`` in fp32 with the dequantised weight (what the kernels compute)."""
    return x.float() @ layer.dequantize().float()


def gated_input(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp16 (transformers' rounding) from a fused gate/up ``[M, 2K]``."""
    half = x.shape[1] // 2
    return torch.nn.functional.silu(x[:, :half].half()) * x[:, half:].half()


if triton is not None:

    @triton.jit
    def _after_previous(PDL: tl.constexpr):
        """What each decode-step kernel does before it touches what the kernels before write.

        With `PDL` (`pdl`): let the kernel after start, then wait until the kernel before has
        finished and its writes are visible. The kernel after waits in turn before it touches
        anything the kernels before may write, and that wait covers this kernel's own, so it
        may launch at once. Before this, kernels read only what no kernel of the step writes:
        the GEMVs' weights (so the next GEMV's loads overlap the end of this kernel and of the
        one before), the norms' weights and orders, and at batch 1 the attention's older keys.
        """
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _silu_mul_kernel(
        x_ptr, out_ptr, K, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        _after_previous(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < K
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float16)
        up = tl.load(x_ptr + row * stride_x + K + offs, mask=mask, other=0.0).to(tl.float16)
        gate = gate.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(tl.float16) * up
        tl.store(out_ptr + row * stride_o + offs, act, mask=mask)


def gated_product(x: torch.Tensor) -> torch.Tensor:
    """`gated_input`: one Triton kernel (`silu_mul`) on a GPU, the torch reference elsewhere."""
    return silu_mul(x) if x.is_cuda and triton is not None else gated_input(x)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """`gated_input` in one Triton kernel (torch needs three: silu, a copy, the product)."""
    rows, width = x.shape
    half = width // 2
    out = torch.empty((rows, half), dtype=torch.float16, device=x.device)
    _silu_mul_kernel[(rows, triton.cdiv(half, 1024))](
        x, out, half, x.stride(0), out.stride(0), BLOCK=1024, num_warps=4, **pdl(x.device)
    )
    return out


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
    rows: torch.Tensor | None = None, window: int | None = None,
    tables: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Q ``[B, H, D]``; caches ``[N, S, KVH, D]``; query ``b`` attends to the first ``lengths[b]``.

    The caches are `N` blocks of `S` positions. Query ``b`` reads block-table row ``rows[b]``
    (row ``b`` without `rows`) of `tables` ``[R, M]``: position ``p`` of row ``r`` is in block
    ``tables[r, p // S]`` at offset ``p % S``. Without `tables`, row ``r`` is block ``r``
    (`identity_tables`). With `window`, a query reads only the last `window` of its keys: the
    query at position ``p = lengths[b] - 1`` sees the keys at ``p - window < j <= p``
    (Mistral's sliding window, as transformers masks it).
    """
    batch, heads, dim = q.shape
    page = k_cache.shape[1]
    group = heads // k_cache.shape[2]
    if tables is None:
        tables = identity_tables(k_cache)
    out = torch.empty_like(q)
    for b in range(batch):
        n = int(lengths[b])
        first = 0 if window is None else max(0, n - window)
        row = b if rows is None else int(rows[b])
        positions = torch.arange(first, n, device=q.device)
        blocks = tables[row].long()[positions // page]
        offsets = positions % page
        k = k_cache[blocks, offsets].float().repeat_interleave(group, dim=1)  # [n - first, H, D]
        v = v_cache[blocks, offsets].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) / math.sqrt(dim)
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


def identity_tables(k_cache: torch.Tensor) -> torch.Tensor:
    """The block tables of a cache read as rows: row ``r`` is block ``r`` (int32 ``[N, 1]``)."""
    count = k_cache.shape[0]
    return torch.arange(count, dtype=torch.int32, device=k_cache.device)[:, None]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' MistralRMSNorm: fp32 statistics, result rounded to fp16, times weight."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(weight.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transformers' rotary embedding (rotate-half form) in the tensor's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# -- GPTQ linear ----------------------------------------------------------------------------------

if triton is not None:

    def _valid_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
        """Keep the split-K factors that divide K into whole blocks."""
        k = named_args["K"]
        return [
            c for c in configs
            if k % (c.kwargs["SPLIT"] * kwargs.get("BLOCK_K", named_args.get("BLOCK_K", 1))) == 0
        ] or configs[:1]  # fmt: skip

    @triton.jit
    def _slot_shifts(BITS: tl.constexpr):
        """Where each of a word's rows sits, in bits (`word_slots`: even rows low, odd high)."""
        pack: tl.constexpr = 32 // BITS
        row = tl.arange(0, pack)
        return BITS * (row // 2 + (pack // 2) * (row % 2))

    _CONFIGS = [
        triton.Config({"BLOCK_N": block_n, "SPLIT": split}, num_warps=warps, num_stages=stages)
        for block_n in (64, 128)
        for split in (1, 2, 4, 8, 16)
        for warps, stages in ((4, 3),)
    ]

    @triton.autotune(
        configs=_CONFIGS,
        key=["N", "K", "BITS", "GROUP", "BLOCK_M", "BLOCK_K"],  # not M: one tuning per M bucket
        prune_configs_by={"early_config_prune": _valid_configs},
        reset_to_zero=["out_ptr"],
        warmup=5,
        rep=20,
        cache_results=True,
    )
    @triton.jit
    def _gptq_kernel(
        x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        M, K, N, stride_xm, stride_om,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, X_GATED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        """``out += x @ W`` for up to 64 rows: tensor cores on codes, scales per group after.

        Codes become fp16 without a conversion instruction (``0x6400 | code`` is the fp16
        ``1024 + code``), the zero point is subtracted in fp16 (exact), and each group's partial
        dot product is scaled once per column. Split-K programs add into `out` atomically.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        pack: tl.constexpr = 32 // BITS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        shifts = _slot_shifts(BITS)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        span = K // SPLIT
        for k0 in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            src = tl.load(perm_ptr + offs_k) if HAS_PERM else offs_k
            rows = x_ptr + offs_m[:, None] * stride_xm + src[None, :]
            if X_GATED:  # x = silu(gate) * up, from a fused gate/up output of width 2K
                gate = tl.load(rows, mask=mask_m[:, None], other=0.0).to(tl.float16)
                up = tl.load(rows + K, mask=mask_m[:, None], other=0.0).to(tl.float16)
                gate = gate.to(tl.float32)
                x = (gate / (1.0 + tl.exp(-gate))).to(tl.float16) * up
            else:
                x = tl.load(rows, mask=mask_m[:, None], other=0.0).to(tl.float16)
            offs_p = k0 // pack + tl.arange(0, BLOCK_K // pack)
            packed = tl.load(w_ptr + offs_p[:, None] * N + offs_n[None, :], mask=mask_n[None, :])
            codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            codes = tl.reshape(codes, [BLOCK_K, BLOCK_N])
            weight = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            group = k0 // GROUP
            zero = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0.0)
            scale = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0)
            weight = weight - (zero + 1024.0)[None, :]
            acc += tl.dot(x, weight) * scale.to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.atomic_add(out, acc, mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _dequantize_kernel(
        w_ptr, s_ptr, z_ptr, out_ptr, N,
        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """fp16 weight ``[K, N]`` (rows in group order) from the packed codes."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        pack: tl.constexpr = 32 // BITS
        offs_p = pid_k * (BLOCK_K // pack) + tl.arange(0, BLOCK_K // pack)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        packed = tl.load(w_ptr + offs_p[:, None] * N + offs_n[None, :], mask=mask_n[None, :])
        shifts = _slot_shifts(BITS)
        codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, [BLOCK_K, BLOCK_N]).to(tl.float16)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        where = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + where, mask=mask_n[None, :])
        zero = tl.load(z_ptr + where, mask=mask_n[None, :])
        out = out_ptr + offs_k[:, None] * N + offs_n[None, :]
        tl.store(out, (codes - zero) * scale, mask=mask_n[None, :])

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
        # (`bench/gemv_variants.py sweep`, docs/benchmarks.md): 32 splits for 4,096 inputs (one
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
        warmup=5,
        rep=20,
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
        (`_after_previous`): weights never change, so under PDL their loads overlap the
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
        _after_previous(PDL)
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
    Mistral-7B's (µs a layer, weights read from memory, not from L2: q/k/v 4.8 against 10.0,
    o 3.8 against 9.9, gate/up 20.5 against 26.1, down 10.6 against 16.3; docs/benchmarks.md).
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


_scratch = threading.local()
"""Each thread's dequantisation buffers, one per device. Per thread, not per process: two
engines prefill from two scheduler threads on one device's default stream, and a shared
buffer could be overwritten by one between the other's dequantisation and its GEMM."""


def scratch_buffer(device: torch.device, size: int) -> torch.Tensor:
    """This thread's fp16 scratch buffer on `device`, at least `size` elements (grown once)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[device] = torch.empty(size, dtype=torch.float16, device=device)
    return buffer[:size]


def release_scratch_buffer(device: torch.device) -> None:
    """Free this thread's scratch buffer on `device` (the next prefill here makes it again)."""
    getattr(_scratch, "buffers", {}).pop(device, None)


def _dequantized(layer: PackedLinear) -> torch.Tensor:
    """The layer's fp16 weight (group-ordered rows) in this thread's scratch buffer."""
    size = layer.in_features * layer.out_features
    weight = scratch_buffer(layer.qweight.device, size).view(layer.in_features, layer.out_features)
    grid = (layer.in_features // 64, triton.cdiv(layer.out_features, 128))
    _dequantize_kernel[grid](
        layer.qweight, layer.scales, layer.zeros, weight, layer.out_features,
        BITS=layer.bits, GROUP=layer.group_size, BLOCK_K=64, BLOCK_N=128, num_warps=4,
    )  # fmt: skip
    return weight


def dense_matmul(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """``x @ W`` in fp16 for many rows (a prefill), through cuBLAS on tensor cores.

    The weight is dequantised into a scratch buffer, then multiplied in one GEMM. For this
    compute-bound work it beats Marlin from about 256 rows (1.25x at 512 rows, 1.7x at 2,048 on
    an H100: docs/benchmarks.md).
    """
    x = x.half() if layer.perm is None else x.half()[:, layer.perm.long()]
    return torch.matmul(x, _dequantized(layer))


def gptq_linear(
    x: torch.Tensor, layer: PackedLinear, out: torch.Tensor, *, gated: bool = False
) -> torch.Tensor:
    """Add ``x @ W`` (fp32) into `out` ``[M, N]``, which the caller zeroed.

    With ``gated``, `x` is a fused gate/up output ``[M, 2K]`` and the input is
    ``silu(gate) * up`` computed on the fly (with transformers' fp16 rounding).
    """
    rows = x.shape[0]
    k, n = layer.in_features, layer.out_features
    if rows > 64:  # prefill: compute-bound, so dequantise once and let cuBLAS multiply
        out += dense_matmul(gated_product(x) if gated else x, layer)
        return out
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_k = min(layer.group_size, 128)
    perm = layer.perm if layer.perm is not None else layer.qweight  # unused when no perm

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"], triton.cdiv(rows, block_m))

    args = (x, perm, layer.qweight, layer.scales, layer.zeros, out,
            rows, k, n, x.stride(0), out.stride(0))  # fmt: skip
    constants = {
        "BITS": layer.bits, "GROUP": layer.group_size, "HAS_PERM": layer.perm is not None,
        "X_GATED": gated, "BLOCK_M": block_m, "BLOCK_K": block_k,
    }  # fmt: skip
    if x.device.type == "cuda":
        _gptq_kernel[grid](*args, **constants)
    else:  # Triton's interpreter (tests on the CPU): no autotuning there
        fixed = {"BLOCK_N": 64, "SPLIT": 2 if k % (2 * block_k) == 0 else 1}
        _gptq_kernel.fn[grid(fixed)](*args, **constants, **fixed)
    return out


# -- attention -----------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, lengths_ptr, rows_ptr, tables_ptr, acc_ptr, stats_ptr, cos_ptr,
        sin_ptr, queries, stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_t, scale,
        window, SPLIT_LEN: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
        HAS_ROWS: tl.constexpr, PER_BLOCK: tl.constexpr, ROPE: tl.constexpr,
        PAGE: tl.constexpr, PAGED: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One split of the keys for `PER_BLOCK` queries and the `GROUP` heads of a KV head.

        The tile has `GROUP_PAD` rows: one query's heads (padded) in a decode step, or the
        heads of `PER_BLOCK` consecutive queries of one prompt (one block-table row, each query
        up to its own length), so that they read each key block once.

        The caches are blocks of `PAGE` positions. With `PAGED`, position ``p`` of the tile's
        table row ``r`` is in block ``tables[r, p // PAGE]`` (`stride_t` apart a row), at offset
        ``p % PAGE``; only the entries of the positions read are loaded. Without, row ``r`` is
        block ``r`` (`identity_tables`, without a table in memory).

        A query of length n (at position ``n - 1``) reads the keys at ``n - window ... n - 1``
        (Mistral's sliding window). The splits cut the keys from the first one any query of the
        tile reads, so keys below it cost nothing, and the last split takes whatever is left.

        With `ROPE` (one query a table row, so no `HAS_ROWS`), `q_ptr` is the step's q/k/v
        projection and each query is at position ``length - 1``: q is rotated here, and the
        split holding a query's position writes that token's rotated k and its v into the
        cache (then reads them with the rest), as `_rope_cache_kernel` would have before.

        With `AHEAD` (and `ROPE`): the other keys and the block tables were written before the
        step began (by earlier steps or the prefill, and the host), so the first block of keys
        and values is read before the wait, like the GEMVs' weights, and each next one once the
        block before is summed; the token's own k and v come from registers, not from the
        cache.
        """
        block = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        if not AHEAD:  # the queries and the cache's keys come from the kernels just before
            _after_previous(PDL)
        per_query: tl.constexpr = GROUP_PAD // PER_BLOCK
        offs_r = tl.arange(0, GROUP_PAD)
        query = block * PER_BLOCK + offs_r // per_query
        g = offs_r % per_query
        valid = (g < GROUP) & (offs_r // per_query < PER_BLOCK) & (query < queries)
        query = tl.where(valid, query, block * PER_BLOCK)
        length = tl.load(lengths_ptr + query)
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + tl.where(valid, g, 0)
        low = tl.maximum(tl.min(length, axis=0) - window, 0)  # the tile's first key
        start = low + split * SPLIT_LEN
        last = tl.max(length, axis=0)
        end = tl.where(split == SPLITS - 1, last, tl.minimum(start + SPLIT_LEN, last))
        first = block * PER_BLOCK
        table_row = tl.load(rows_ptr + first).to(tl.int64) if HAS_ROWS else first.to(tl.int64)
        k_ptr += kv_head * stride_ch
        v_ptr += kv_head * stride_ch
        table = tables_ptr + table_row * stride_t  # PAGED; else the row is the block
        q_rows = q_ptr + query[:, None] * stride_qb + heads[:, None] * stride_qh
        if AHEAD:  # the step's lengths, tables and earlier tokens' keys: written before the step
            k_ahead, v_ahead = _kv_block(
                k_ptr, v_ptr, table, table_row, start, end, stride_cb, stride_cs, offs_d,
                BLOCK_S, PAGE, PAGED,
            )  # fmt: skip
            _after_previous(PDL)
        if ROPE:
            q = _rotated(q_rows, length - 1, cos_ptr, sin_ptr, valid, HEAD_DIM)
            position = tl.load(lengths_ptr + first + tl.zeros([1], tl.int32)) - 1  # its k, v
            here = (position >= start) & (position < end)
            kv_heads = tl.num_programs(1)
            k_rows = q_ptr + first * stride_qb + GROUP * kv_heads * stride_qh
            k_new = _rotated(k_rows + kv_head * stride_qh + tl.zeros([1, 1], tl.int32),
                             position, cos_ptr, sin_ptr, here, HEAD_DIM)  # fmt: skip
            v_rows = k_rows + (kv_heads + kv_head) * stride_qh + offs_d[None, :]
            v_new = tl.load(v_rows, mask=here[:, None], other=0.0).to(tl.float16)
            if PAGED:
                page = tl.load(table + position // PAGE, mask=here, other=0).to(tl.int64)
            else:
                page = table_row + tl.zeros([1], tl.int64)
            at = page[:, None] * stride_cb + (position % PAGE)[:, None] * stride_cs
            at = at + offs_d[None, :]
            tl.store(k_ptr + at, k_new, mask=here[:, None])
            tl.store(v_ptr + at, v_new, mask=here[:, None])
            if not AHEAD:  # read back below with the other keys
                tl.debug_barrier()  # written by some of this program's threads, read by others
        else:
            q = tl.load(q_rows + offs_d[None, :], mask=valid[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < end
            if AHEAD:  # read before this token's k and v were written: those from registers
                mine = (offs_s == position)[:, None]
                k, v = tl.where(mine, k_new, k_ahead), tl.where(mine, v_new, v_ahead)
            else:
                k, v = _kv_block(
                    k_ptr, v_ptr, table, table_row, s0, end, stride_cb, stride_cs, offs_d,
                    BLOCK_S, PAGE, PAGED,
                )  # fmt: skip
            scores = tl.dot(q, tl.trans(k)) * scale
            seen = mask_s[None, :] & (offs_s[None, :] < length[:, None])  # this split, causal
            seen = seen & (offs_s[None, :] >= length[:, None] - window)  # the sliding window
            scores = tl.where(seen, scores, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no key yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            m_i = m_new
            if AHEAD:  # the next block, once this one is done with (registers for one block)
                k_ahead, v_ahead = _kv_block(
                    k_ptr, v_ptr, table, table_row, s0 + BLOCK_S, end, stride_cb, stride_cs,
                    offs_d, BLOCK_S, PAGE, PAGED,
                )  # fmt: skip
        row = (query * tl.num_programs(1) + kv_head) * SPLITS + split
        slot = row * GROUP_PAD + g
        out = acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(out, acc, mask=valid[:, None])
        tl.store(stats_ptr + slot * 2, m_i, mask=valid)
        tl.store(stats_ptr + slot * 2 + 1, l_i, mask=valid)

    @triton.jit
    def _kv_block(
        k_ptr, v_ptr, table, table_row, s0, end, stride_cb, stride_cs, offs_d,
        BLOCK_S: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
    ):  # fmt: skip
        """The keys and values of a row's positions ``s0 ... s0 + BLOCK_S`` before `end`.

        Those after `end` are 0, their table entries not read. Position ``p`` is in block
        ``table[p // PAGE]`` (`PAGED`; else block `table_row`) at offset ``p % PAGE``, its
        address in int64 (a cache may hold more than 2**31 elements).
        """
        offs_s = s0 + tl.arange(0, BLOCK_S)
        inside = offs_s < end
        if PAGED:
            page = tl.load(table + offs_s // PAGE, mask=inside, other=0).to(tl.int64)
            offset = offs_s % PAGE
        else:  # positions before `end` are all in the row's block
            page = table_row + tl.zeros([BLOCK_S], tl.int64)
            offset = offs_s
        where = page[:, None] * stride_cb + offset[:, None] * stride_cs + offs_d[None, :]
        return (
            tl.load(k_ptr + where, mask=inside[:, None], other=0.0),
            tl.load(v_ptr + where, mask=inside[:, None], other=0.0),
        )

    @triton.jit
    def _rotated(rows, position, cos_ptr, sin_ptr, mask, HEAD_DIM: tl.constexpr):
        """Transformers' rotary embedding, with its fp16 rounding, of the heads at `rows`.

        `rows` are ``[R, 1]`` pointers to each head's start, rotated at `position` ``[R]``.
        """
        half: tl.constexpr = HEAD_DIM // 2
        offs = tl.arange(0, HEAD_DIM)[None, :]
        x = tl.load(rows + offs, mask=mask[:, None], other=0.0).to(tl.float16)
        partner = tl.load(rows + (offs + half) % HEAD_DIM, mask=mask[:, None], other=0.0)
        partner = partner.to(tl.float16)
        rotated = tl.where(offs < half, -partner, partner)
        table = position[:, None] * HEAD_DIM + offs
        cos = tl.load(cos_ptr + table, mask=mask[:, None], other=0.0)
        sin = tl.load(sin_ptr + table, mask=mask[:, None], other=0.0)
        return (x * cos).to(tl.float16) + (rotated * sin).to(tl.float16)

    @triton.jit
    def _combine_kernel(
        acc_ptr,
        stats_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        scatter_ptr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        HAS_SCATTER: tl.constexpr,
        PDL: tl.constexpr,
    ):
        _after_previous(PDL)
        batch = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        g = head % GROUP
        offs_s = tl.arange(0, SPLITS)
        rows = ((batch * tl.num_programs(1) // GROUP + kv_head) * SPLITS + offs_s) * GROUP_PAD + g
        m = tl.load(stats_ptr + rows * 2)
        l_s = tl.load(stats_ptr + rows * 2 + 1)
        m_max = tl.max(m, axis=0)
        weight = tl.where(l_s > 0, tl.exp(m - m_max), 0.0)
        total = tl.sum(weight * l_s, axis=0)
        offs_d = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :])
        out = tl.sum(acc * weight[:, None], axis=0) / total
        dst = head * stride_oh + offs_d
        if HAS_SCATTER:
            dst = tl.load(scatter_ptr + head * HEAD_DIM + offs_d)
        tl.store(out_ptr + batch * stride_ob + dst, out.to(tl.float16))


def _attention_launch(batch: int, rope: bool) -> dict[str, Any]:
    """How `decode_attention` launches `_decode_attention_kernel` for `batch` queries.

    One query with rotary (a batch-1 decode step) reads its first keys ahead of the wait, with
    8 warps a program: H200, a captured step of the 7B at 768 keys, 1.68-1.71 ms against
    1.79-1.81 with 4 warps or neither (and 1.84-1.85 with 8 warps without the read ahead).
    Many queries keep 4 warps and read after the wait: a 32-row step took 10.1 ms with 8 warps
    against 9.3-9.5 with 4 (`bench/step_costs.py`, docs/benchmarks.md).
    """
    ahead = rope and batch == 1
    return {"BLOCK_S": 64, "num_warps": 8 if ahead else 4, "AHEAD": ahead}


class AttentionWorkspace:
    """Scratch buffers of `decode_attention` for a batch size (allocated once, graph-safe).

    The keys are cut into `splits` parts, each a program of its own, then combined. Few rows
    need many parts to fill the GPU; many rows fill it anyway, and every part costs the combine
    a read: so 32 parts up to 8 query blocks, down to 4 parts from 64 (unless `splits` is given).

    `max_len` is the most keys a query has (the positions a block-table row holds). `window` is
    the model's sliding window (``None``: none): a query reads at most that many keys, so the
    parts cut the last `window` keys instead of all `max_len`.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device,
        splits: int | None = None,
        shared_rows: bool = False,
        window: int | None = None,
    ) -> None:
        self.group = heads // kv_heads
        self.group_pad = max(16, triton.next_power_of_2(self.group))
        self.per_block = self.group_pad // self.group
        """Queries of one prompt (one table row) that a program's tile holds together."""
        blocks = triton.cdiv(batch, self.per_block) if shared_rows else batch
        self.splits = splits or max(4, min(32, triton.next_power_of_2(256 // blocks + 1) // 2))
        self.window = max_len if window is None else min(window, max_len)
        """The keys before a query that it reads, itself included (all `max_len`: no window)."""
        span = self.window + (self.per_block - 1 if shared_rows else 0)  # keys a tile reads
        self.split_len = triton.cdiv(min(span, max_len), self.splits)
        rows = batch * kv_heads * self.splits * self.group_pad
        self.acc = torch.empty((rows, head_dim), dtype=torch.float32, device=device)
        self.stats = torch.empty((rows, 2), dtype=torch.float32, device=device)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    work: AttentionWorkspace,
    out: torch.Tensor,
    scatter: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """`decode_attention_reference`, on the GPU, into `out` ``[B, H, D]``.

    The caches ``[N, S, KVH, D]`` are `N` blocks of `S` positions. `tables` (int32 ``[R, M]``,
    each row contiguous) are the block tables: query ``b`` reads row ``rows[b]`` (row ``b``
    without `rows`), where position ``p`` is in block ``tables[row, p // S]`` at offset
    ``p % S``. Only the entries of the positions a query reads are loaded: the others may hold
    anything (-1 for blocks released by the sliding window). Without `tables`, row ``r`` is
    block ``r`` (`identity_tables`: a cache ``[R, max_len, KVH, D]`` of one row a request).

    Each query reads the last ``work.window`` of its keys (the model's sliding window, given to
    `AttentionWorkspace`).

    `rows`: the table row of each query, for the tokens of one prompt (a decode-shaped
    prefill): consecutive queries are taken together, so queries sharing a block of
    ``work.per_block`` must share their row (the step's queries are all of one prompt).

    With `scatter` (int32 ``[H * D]``), `out` is ``[B, H * D]`` and element ``h * D + d`` goes
    to column ``scatter[h * D + d]``: o_proj's act-order input order.

    With `rope` (the cos and sin tables), `q` is the step's fused q/k/v projection
    ``[B, (H + 2 * KVH) * D]``, each token at position ``lengths - 1``: its q and k are
    rotated and its k and v written into the caches first (at that position's block of its
    table row), as `rope_and_cache` does. Not with `rows`: there, queries read keys that other
    programs' tokens write (`rope_and_cache` first).
    """
    if rope is not None and rows is not None:
        msg = "decode_attention: rope= needs one query a table row; with rows=, run rope_and_cache"
        raise ValueError(msg)
    batch = q.shape[0]
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    per_block = work.per_block if rows is not None else 1
    cos, sin = rope if rope is not None else (lengths, lengths)
    _decode_attention_kernel[(triton.cdiv(batch, per_block), kv_heads, work.splits)](
        q, k_cache, v_cache, lengths, rows if rows is not None else lengths,
        tables if tables is not None else lengths, work.acc, work.stats, cos, sin, batch,
        q.stride(0), dim if rope is not None else q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), tables.stride(0) if tables is not None else 0,
        1.0 / math.sqrt(dim), work.window, SPLIT_LEN=work.split_len, GROUP=work.group,
        GROUP_PAD=work.group_pad, HEAD_DIM=dim, SPLITS=work.splits, HAS_ROWS=rows is not None,
        PER_BLOCK=per_block, ROPE=rope is not None, PAGE=k_cache.shape[1],
        PAGED=tables is not None, **_attention_launch(batch, rope is not None), **pdl(q.device),
    )  # fmt: skip
    heads = out.shape[1] if scatter is None else out.shape[1] // dim
    _combine_kernel[(batch, heads)](
        work.acc, work.stats, out, out.stride(0), dim if scatter is not None else out.stride(1),
        scatter if scatter is not None else lengths, GROUP=work.group, GROUP_PAD=work.group_pad,
        HEAD_DIM=dim, SPLITS=work.splits, HAS_SCATTER=scatter is not None, num_warps=4,
        **pdl(q.device),
    )  # fmt: skip
    return out


# -- norms and rotary ----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,
        residual_ptr,
        w_ptr,
        out_ptr,
        N,
        eps,
        stride_x,
        stride_r,
        stride_o,
        gather_ptr,
        HAS_RESIDUAL: tl.constexpr,
        HAS_GATHER: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # constants: read before the wait
        if HAS_GATHER:
            src = tl.load(gather_ptr + offs, mask=mask, other=0)
        _after_previous(PDL)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float16)
        if HAS_RESIDUAL:
            res = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(tl.float16)
            tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
        h = x.to(tl.float32)
        scale = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        if HAS_GATHER:  # the same values in the next layer's order, exchanged on chip
            h = tl.gather(h, src, axis=0)
        h = h * scale
        tl.store(out_ptr + row * stride_o + offs, (h.to(tl.float16) * w).to(tl.float16), mask=mask)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual += x`` (fp16, when given); ``out = rms_norm(residual or x)``.

    With `gather` (int32 ``[N]``, a permutation), column ``j`` of `out` is column
    ``gather[j]`` of the result (the next layer's act-order input order), and `weight` must
    be given in that order too.
    Rows may be strided (column slices of a wider buffer); columns must be contiguous.
    """
    rows, n = x.shape
    _add_rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        n,
        eps,
        x.stride(0),
        (residual if residual is not None else x).stride(0),
        out.stride(0),
        gather if gather is not None else weight,
        HAS_RESIDUAL=residual is not None,
        HAS_GATHER=gather is not None,
        BLOCK=triton.next_power_of_2(n),
        num_warps=8,
        **pdl(x.device),
    )
    return out


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, positions_ptr, rows_ptr, tables_ptr, q_ptr, k_ptr, v_ptr,
        stride_qkv, stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_t,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, PAGED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One head of one token: round to fp16, rotate q/k, write q out and k/v to the cache.

        The token's k and v go to block ``tables[row, position // PAGE]`` at offset
        ``position % PAGE`` (`PAGED`; else to block ``row`` at offset ``position``).
        """
        _after_previous(PDL)
        token = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, HEAD_DIM)[None, :]  # a [1, HEAD_DIM] tile, as `_rotated` takes
        base = qkv_ptr + token * stride_qkv + head * HEAD_DIM + tl.zeros([1, 1], tl.int32)
        position = tl.load(positions_ptr + token + tl.zeros([1], tl.int32))
        row = tl.load(rows_ptr + token).to(tl.int64)
        if head < HEADS + KV_HEADS:
            x = _rotated(base, position, cos_ptr, sin_ptr, tl.full([1], 1, tl.int1), HEAD_DIM)
        else:
            x = tl.load(base + offs).to(tl.float16)
        if PAGED:
            page = tl.load(tables_ptr + row * stride_t + position // PAGE).to(tl.int64)
            offset = position % PAGE
        else:
            page = row + tl.zeros([1], tl.int64)
            offset = position
        cache = page[:, None] * stride_cb + offset[:, None] * stride_cs + offs
        if head < HEADS:
            tl.store(q_ptr + token * stride_qb + head * stride_qh + offs, x)
        elif head < HEADS + KV_HEADS:
            tl.store(k_ptr + cache + (head - HEADS) * stride_ch, x)
        else:
            tl.store(v_ptr + cache + (head - HEADS - KV_HEADS) * stride_ch, x)


def rope_and_cache(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    rows: torch.Tensor, q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    tables: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q/k rotary embedding into `q_out`, and each token's k and v into the caches.

    The caches ``[N, S, KVH, D]`` are `N` blocks of `S` positions; token ``t`` is written at
    block ``tables[rows[t], positions[t] // S]``, offset ``positions[t] % S`` (`tables`: int32
    ``[R, M]``, each row contiguous; only those entries are read). Without `tables`, row ``r``
    is block ``r`` (`identity_tables`: a cache of one row a request).
    """
    tokens = qkv.shape[0]
    heads, kv_heads, dim = q_out.shape[1], k_cache.shape[2], q_out.shape[2]
    _rope_cache_kernel[(tokens, heads + 2 * kv_heads)](
        qkv, cos, sin, positions, rows, tables if tables is not None else rows, q_out, k_cache,
        v_cache, qkv.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0) if tables is not None else 0, HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=dim, PAGE=k_cache.shape[1], PAGED=tables is not None, num_warps=1,
        **pdl(qkv.device),
    )  # fmt: skip
    return q_out
