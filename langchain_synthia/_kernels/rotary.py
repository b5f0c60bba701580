"""Rotary position embedding (transformers' rotate-half form, fp16 rounding) and the KV write.

* `rope_and_cache`: q and k rotated, q written out and each token's k and v written into
  the paged cache, in one Triton kernel (a prefill; a decode step does both inside
  `attention.decode_attention`).
* `rotated_heads`: the rotation of heads in a Triton kernel, which both of those use.
* `rotate`: the torch reference.
"""

import torch

from langchain_synthia._kernels._triton import pdl, tl, triton


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transformers' rotary embedding (rotate-half form) in the tensor's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


if triton is not None:
    from langchain_synthia._kernels._triton import after_previous

    @triton.jit
    def rotated_heads(rows, position, cos_ptr, sin_ptr, mask, HEAD_DIM: tl.constexpr):
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
        after_previous(PDL)
        token = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, HEAD_DIM)[None, :]  # a [1, HEAD_DIM] tile, as `rotated_heads` takes
        base = qkv_ptr + token * stride_qkv + head * HEAD_DIM + tl.zeros([1, 1], tl.int32)
        position = tl.load(positions_ptr + token + tl.zeros([1], tl.int32))
        row = tl.load(rows_ptr + token).to(tl.int64)
        if head < HEADS + KV_HEADS:
            x = rotated_heads(base, position, cos_ptr, sin_ptr, tl.full([1], 1, tl.int1), HEAD_DIM)
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
