"""`decode_attention` and `rope_and_cache` through block tables over a shared pool of
KV-cache blocks (the paged cache), against the references with the same tables.
"""

from typing import Any

import pytest
import torch

from langchain_synthia import _kernels as K
from langchain_synthia._fast_model import _rotary_tables
from langchain_synthia._kernels import attention
from tests.helpers import padded, rel

pytestmark = pytest.mark.usefixtures("interpreted_kernels")

FP16_REL = 2e-3
"""‖kernel - reference‖ / ‖reference‖ for fp16 inputs (fp32 accumulation: ~5e-4 measured)."""

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
        qkv = padded(tokens, width, torch.float32)  # a linear layer's fp32 output, sliced
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


def _decode_names(*runs: str) -> tuple[list[str], list[str]]:
    return [f"{run}_vs_reference" for run in runs], [f"{run}_equals_dense" for run in runs]


def _rope_names(prefix: str) -> tuple[list[str], list[str]]:
    checks = ("out_equal", "pools_equal", "pool_written", "finite")
    runs = [f"{prefix}rope_batch{batch}" for batch in (1, 5)]
    equal = [f"{run}_{check}" for run in runs for check in checks] + ["reads_ahead_at_batch1"]
    return [f"{run}_vs_reference" for run in runs], equal


PAGED_NAMES = {
    "decode": _decode_names("decode", "decode_splits4"),
    "decode-mha": _decode_names("decode", "decode_splits4"),
    "scatter": (["decode_vs_reference"], ["decode_equals_dense", "scattered"]),
    "rows": _decode_names("rows", "rows_spread"),
    "rope": _rope_names(""),
    "window": (
        _decode_names("window_splits8", "window_splits4", "window_rows")[0]
        + _rope_names("window_")[0],
        _decode_names("window_splits8", "window_splits4", "window_rows")[1]
        + _rope_names("window_")[1]
        + ["blocks_released"],
    ),
    "cache": (
        [f"{kind}_{x}_vs_rotate" for kind in ("decode", "prefill") for x in ("q", "k")],
        [f"{kind}_{x}" for kind in ("decode", "prefill")
         for x in ("v_written", "rest_of_pool_untouched")],
    ),
}  # fmt: skip
"""Each paged case's rel errors and equalities, by name (none may go missing)."""


@pytest.mark.parametrize("way", PAGED_CASES)
def test_paged_kv_cache_is_read_and_written_through_block_tables(
    way: str, gen: torch.Generator
) -> None:
    """Caches of blocks of 16 positions, each row's blocks dealt from a shuffled shared pool
    (rows interleaved), tables wider than needed (-1, or past the pool, in unused entries and in
    blocks wholly before the sliding window), every slot no row holds NaN; lengths 1, 15, 16,
    17 and 53. Decode steps (GQA and MHA, 8 and 4 key splits), into o_proj's scattered order,
    one prompt's tokens in one table row (`rows`, per-block tiles), rotary inside the kernel
    (batch 1 reading ahead, batch 5), a window of 24, and `rope_and_cache` (decode-like and
    prefill-like): each against `decode_attention_reference` with the same tables, and the
    attention bit for bit against the kernel on the same keys one row a request."""
    m = check_paged(way, *PAGED_CASES[way], gen)
    rel_names, equal_names = PAGED_NAMES[way]
    assert m["finite"]
    assert sorted(m["rel"]) == sorted(rel_names)
    assert all(error < FP16_REL for error in m["rel"].values())
    assert sorted(m["equal"]) == sorted(equal_names)
    assert all(m["equal"].values())
