"""GPTQ int4/int8 linear layers (act order, any group size) on tensor cores.

* `gptq_linear`: up to 64 rows through one kernel that multiplies the codes on tensor
  cores and scales each group after, accumulated with atomics (split-K) into a zeroed
  fp32 buffer; more rows (a prefill) through `dense_matmul`.
* `dense_matmul`: the weight dequantised into this thread's `scratch_buffer`, then one
  cuBLAS GEMM.
* `gptq_linear_reference`: ``x @ W`` in fp32 with the dequantised weight.
"""

import threading
from typing import Any

import torch

from langchain_synthia._gptq import PackedLinear
from langchain_synthia._kernels._triton import short_bench, tl, triton
from langchain_synthia._kernels.activation import gated_product


def gptq_linear_reference(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """``x @ W`` in fp32 with the dequantised weight (what the kernels compute)."""
    return x.float() @ layer.dequantize().float()


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
        do_bench=short_bench,
        cache_results=True,
    )
    @triton.jit(do_not_specialize=["SPLIT"])
    def _gptq_kernel(
        x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        M, K, N, stride_xm, stride_om, SPLIT,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, X_GATED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """``out += x @ W`` for up to 64 rows: tensor cores on codes, scales per group after.

        Codes become fp16 without a conversion instruction (``0x6400 | code`` is the fp16
        ``1024 + code``), the zero point is subtracted in fp16 (exact), and each group's partial
        dot product is scaled once per column. Split-K programs add into `out` atomically.
        `SPLIT` (how many programs share a column block's K) is an ordinary argument, not a
        compile-time one: the autotuner's split-K candidates share one compiled kernel per
        tile width, which keeps a fresh machine's first load short.
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
    compute-bound work it beats Marlin from about 256 rows on Hopper (docs/benchmarks.md).
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
