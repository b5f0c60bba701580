"""RMSNorm with the residual add, as transformers' MistralRMSNorm rounds it.

* `add_rms_norm`: ``residual += x`` and the norm in one Triton kernel, optionally writing
  the columns in the next layer's act-order input order.
* `rms_norm_reference`: the norm in torch.
"""

import torch

from langchain_synthia._kernels._triton import pdl, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' MistralRMSNorm: fp32 statistics, result rounded to fp16, times weight."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(weight.dtype)


if triton is not None:
    from langchain_synthia._kernels._triton import after_previous

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
        after_previous(PDL)
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
