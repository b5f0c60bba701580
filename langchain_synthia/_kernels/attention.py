"""Decode attention over the paged KV cache (flash-decoding), and its torch reference.

* `decode_attention`: one query token per row against its keys, lengths and block tables
  read on the device (CUDA-graph safe), the keys split over programs and then combined;
  for a decode step it also rotates q and k and writes the step's k and v into the cache.
* `AttentionWorkspace`: its scratch buffers for a batch size, allocated once.
* `decode_attention_reference`: the same in torch, with the same sliding window.
* `identity_tables`: the block tables of a cache of one row a request.
"""

import math
from typing import Any

import torch

from langchain_synthia._kernels._triton import pdl, tl, triton


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


if triton is not None:
    from langchain_synthia._kernels._triton import after_previous
    from langchain_synthia._kernels.rotary import rotated_heads

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
            after_previous(PDL)
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
            after_previous(PDL)
        if ROPE:
            q = rotated_heads(q_rows, length - 1, cos_ptr, sin_ptr, valid, HEAD_DIM)
            position = tl.load(lengths_ptr + first + tl.zeros([1], tl.int32)) - 1  # its k, v
            here = (position >= start) & (position < end)
            kv_heads = tl.num_programs(1)
            k_rows = q_ptr + first * stride_qb + GROUP * kv_heads * stride_qh
            k_new = rotated_heads(k_rows + kv_head * stride_qh + tl.zeros([1, 1], tl.int32),
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
        after_previous(PDL)
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
    8 warps a program: the fastest batch-1 step of those timed (4 or 8 warps, reading ahead or
    after the wait). Many queries keep 4 warps and read after the wait, which is faster for
    them (docs/benchmarks.md).
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
