"""The gated activation ``silu(gate) * up`` of a fused gate/up output: Triton and torch.

* `gated_input`: the torch reference (transformers' fp16 rounding).
* `silu_mul`: the same in one Triton kernel; `gated_product` picks it on a GPU.
"""

import torch

from langchain_synthia._kernels._triton import pdl, tl, triton


def gated_input(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp16 (transformers' rounding) from a fused gate/up ``[M, 2K]``."""
    half = x.shape[1] // 2
    return torch.nn.functional.silu(x[:, :half].half()) * x[:, half:].half()


if triton is not None:
    from langchain_synthia._kernels._triton import after_previous

    @triton.jit
    def _silu_mul_kernel(
        x_ptr, out_ptr, K, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        after_previous(PDL)
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
