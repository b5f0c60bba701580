"""`decode_attention` against its torch reference and attention written out, with and
without Mistral's sliding window, one KV-cache row a request (no block tables).
"""

import math
from typing import Any

import pytest
import torch

from langchain_synthia import _kernels as K
from langchain_synthia._fast_model import _rotary_tables
from tests.helpers import rel

pytestmark = pytest.mark.usefixtures("interpreted_kernels")

FP16_REL = 2e-3
"""‖kernel - reference‖ / ‖reference‖ for fp16 inputs (fp32 accumulation: ~5e-4 measured)."""

ATTENTION_CASES = [(8, 2, 64), (8, 2, 128), (4, 4, 64)]
"""(heads, kv heads, head dim)."""
WINDOW_CASES = [(8, 2, 64, window) for window in (1, 7, 100, 160, 5000)] + [(4, 4, 32, 64)]
"""(heads, kv heads, head dim, sliding window) of `decode_attention` with a window, on lengths
1, 100 and 160 (the cache's length): windows smaller than, equal to and larger than them."""
WINDOW_LEN = 160


def check_attention(heads: int, kv_heads: int, dim: int, gen: torch.Generator) -> dict:

    batch, cache_rows, max_len = 3, 5, 2100
    lengths = torch.tensor([1, 1000, max_len], dtype=torch.int32)  # 1000: not a block multiple
    perm = torch.randperm(batch, generator=gen)
    lengths = lengths[perm].contiguous()
    q = (torch.randn(batch, heads, dim, generator=gen) * 2).half()
    k_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    v_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    work = K.AttentionWorkspace(batch, heads, kv_heads, dim, max_len, torch.device("cpu"))
    out = torch.full_like(q, float("nan"))
    K.decode_attention(q, k_cache, v_cache, lengths, work, out)
    ref = K.decode_attention_reference(q, k_cache, v_cache, lengths)
    # o_proj's act-order input order: element h * D + d lands in column scatter[h * D + d]
    scatter = torch.randperm(heads * dim, generator=gen).to(torch.int32)
    scattered = torch.full((batch, heads * dim), float("nan"), dtype=torch.float16)
    K.decode_attention(q, k_cache, v_cache, lengths, work, scattered, scatter)
    in_order = torch.empty_like(scattered)
    in_order[:, scatter.long()] = out.reshape(batch, -1)
    # the GQA mapping itself, written out: head h reads kv head h // (heads / kv_heads)
    group = heads // kv_heads
    manual = torch.empty(batch, heads, dim)
    for b in range(batch):
        n = int(lengths[b])
        for h in range(heads):
            keys, values = k_cache[b, :n, h // group].float(), v_cache[b, :n, h // group].float()
            weights = (keys @ q[b, h].float() / math.sqrt(dim)).softmax(0)
            manual[b, h] = weights @ values
    # the tokens of one prompt in another cache row (a prompt's rest after a cached prefix):
    # read together, each up to its own length
    rows = torch.tensor([4, 4, 4], dtype=torch.long)
    routed = torch.full_like(q, float("nan"))
    K.decode_attention(q, k_cache, v_cache, lengths, work, routed, rows=rows)
    routed_ref = K.decode_attention_reference(q, k_cache, v_cache, lengths, rows)
    routed_manual = torch.empty(batch, heads, dim)
    for b in range(batch):
        n, r = int(lengths[b]), int(rows[b])
        for h in range(heads):
            keys, values = k_cache[r, :n, h // group].float(), v_cache[r, :n, h // group].float()
            weights = (keys @ q[b, h].float() / math.sqrt(dim)).softmax(0)
            routed_manual[b, h] = weights @ values
    # fewer, longer key splits (what wide batches use): the same attention
    few = K.AttentionWorkspace(batch, heads, kv_heads, dim, max_len, torch.device("cpu"), splits=4)
    coarse = torch.full_like(q, float("nan"))
    K.decode_attention(q, k_cache, v_cache, lengths, few, coarse)
    return {
        "rel_four_splits_vs_reference": rel(coarse, ref),
        "rel_routed_vs_reference": rel(routed, routed_ref),
        "rel_routed_vs_definition": rel(routed, routed_manual),
        "routed_differs_from_own_rows": rel(routed, out) > 0.1,
        "rel_vs_reference": rel(out, ref),
        "rel_vs_definition": rel(out, manual),
        "rel_per_row": {int(lengths[b]): rel(out[b], manual[b]) for b in range(batch)},
        "finite": bool(torch.isfinite(out).all()),
        "scattered_equal": bool(torch.equal(scattered, in_order)),
    }


def windowed_definition(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
    rows: torch.Tensor, window: int,
) -> torch.Tensor:  # fmt: skip
    """Mistral's sliding-window attention written out: position p sees ``p - window < j <= p``."""
    batch, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        p, r = int(lengths[b]) - 1, int(rows[b])
        seen = [j for j in range(p + 1) if p - window < j]
        for h in range(heads):
            keys = k_cache[r, seen, h // group].float()
            values = v_cache[r, seen, h // group].float()
            out[b, h] = (keys @ q[b, h].float() / math.sqrt(dim)).softmax(0) @ values
    return out


def check_window(heads: int, kv_heads: int, dim: int, window: int, gen: torch.Generator) -> dict:
    """`decode_attention` with a sliding window, each way the engine calls it, against
    `decode_attention_reference` and `windowed_definition`; every rel error by name."""

    cpu, cache_rows, max_len = torch.device("cpu"), 4, WINDOW_LEN
    k_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    v_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
    errors, equal = {}, {}

    def compare(name: str, out: torch.Tensor, ref: torch.Tensor, definition: torch.Tensor) -> None:
        errors[f"{name}_vs_reference"] = rel(out, ref)
        errors[f"{name}_vs_definition"] = rel(out, definition)

    def workspace(batch: int, **options: Any) -> Any:
        return K.AttentionWorkspace(batch, heads, kv_heads, dim, max_len, cpu, window=window,
                                    **options)  # fmt: skip

    # a decode step of 3 rows (lengths 1, 100 and the whole cache), and of 1 row
    lengths = torch.tensor([1, 100, max_len], dtype=torch.int32)
    lengths = lengths[torch.randperm(3, generator=gen)].contiguous()
    q = (torch.randn(3, heads, dim, generator=gen) * 2).half()
    own = torch.arange(3)
    for splits in (None, 4):  # the workspace's own split count, and the few of wide batches
        out = torch.full_like(q, float("nan"))
        K.decode_attention(q, k_cache, v_cache, lengths, workspace(3, splits=splits), out)
        ref = K.decode_attention_reference(q, k_cache, v_cache, lengths, window=window)
        compare(f"batch3_splits{splits}", out, ref,
                windowed_definition(q, k_cache, v_cache, lengths, own, window))  # fmt: skip
    one = slice(lengths.argmax().item(), lengths.argmax().item() + 1)  # the longest row alone
    alone = torch.full_like(q[one], float("nan"))
    one_row = (q[one], k_cache[one], v_cache[one], lengths[one])
    K.decode_attention(*one_row, workspace(1), alone)
    compare("batch1", alone, ref[one], windowed_definition(*one_row, own, window))
    # with rotary: the step's q/k/v projection, rotated and written inside the kernel
    cos, sin = _rotary_tables(10000.0, dim, max_len, cpu)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen) * 2
    lengths = torch.tensor([max_len, 1, 100], dtype=torch.int32)  # batch 1: the longest
    for batch in (1, 3):
        caches = (k_cache.clone(), v_cache.clone())
        rope_q = torch.empty(batch, heads, dim, dtype=torch.float16)
        expected = (k_cache.clone(), v_cache.clone())
        K.rope_and_cache(qkv[:batch], cos, sin, (lengths[:batch] - 1).long(), own[:batch],
                         rope_q, *expected)  # fmt: skip
        out = torch.full((batch, heads, dim), float("nan"), dtype=torch.float16)
        K.decode_attention(qkv[:batch], *caches, lengths[:batch], workspace(batch, splits=8),
                           out, rope=(cos, sin))  # fmt: skip
        ref = K.decode_attention_reference(rope_q, *expected, lengths[:batch], window=window)
        compare(f"rope_batch{batch}", out, ref,
                windowed_definition(rope_q, *expected, lengths[:batch], own, window))  # fmt: skip
        equal[f"rope_batch{batch}_caches_written"] = all(map(torch.equal, caches, expected))
    # a prompt's rest in cache row 2: 21 queries at positions 120..139 and a copy of the last
    # (as a padded suffix step), read together, each up to its own position
    positions = torch.tensor([*range(120, 140), 139])
    rest = (positions + 1).to(torch.int32)
    rows = torch.full((len(positions),), 2, dtype=torch.long)
    q_rest = (torch.randn(len(positions), heads, dim, generator=gen) * 2).half()
    out = torch.full_like(q_rest, float("nan"))
    work = workspace(len(positions), shared_rows=True, splits=8)
    K.decode_attention(q_rest, k_cache, v_cache, rest, work, out, rows=rows)
    ref = K.decode_attention_reference(q_rest, k_cache, v_cache, rest, rows, window)
    compare("rows", out, ref,
            windowed_definition(q_rest, k_cache, v_cache, rest, rows, window))  # fmt: skip
    # queries of one row far apart (not a suffix step's): the last split takes the rest
    spread = torch.tensor([1, 100, max_len, 50], dtype=torch.int32)
    rows = torch.full((4,), 1, dtype=torch.long)
    out = torch.full_like(q_rest[:4], float("nan"))
    K.decode_attention(q_rest[:4], k_cache, v_cache, spread, workspace(4, shared_rows=True),
                       out, rows=rows)  # fmt: skip
    ref = K.decode_attention_reference(q_rest[:4], k_cache, v_cache, spread, rows, window)
    compare("rows_spread", out, ref,
            windowed_definition(q_rest[:4], k_cache, v_cache, spread, rows, window))  # fmt: skip
    windowed = K.decode_attention_reference(q, k_cache, v_cache, lengths, window=window)
    unwindowed = K.decode_attention_reference(q, k_cache, v_cache, lengths)
    return {
        "rel": errors,
        "equal": equal,
        "finite": bool(torch.isfinite(out).all()),
        "window_changes_the_answer": rel(windowed, unwindowed) > 1e-3,
    }


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), ATTENTION_CASES)
def test_decode_attention_matches_the_reference(
    heads: int, kv_heads: int, dim: int, gen: torch.Generator
) -> None:
    """Batch 3 with lengths 1, 1000 and 2100 (ragged, not block multiples), GQA and MHA."""
    m = check_attention(heads, kv_heads, dim, gen)
    assert m["finite"]
    assert m["scattered_equal"]  # written straight into o_proj's act-order input order
    assert m["rel_vs_reference"] < FP16_REL
    assert m["rel_vs_definition"] < FP16_REL
    assert sorted(int(length) for length in m["rel_per_row"]) == [1, 1000, 2100]
    assert all(error < FP16_REL for error in m["rel_per_row"].values())
    # `rows`: each query reads the cache row it is given (a prompt's rest after a prefix)
    assert m["rel_routed_vs_reference"] < FP16_REL
    assert m["rel_routed_vs_definition"] < FP16_REL
    assert m["routed_differs_from_own_rows"]
    assert m["rel_four_splits_vs_reference"] < FP16_REL


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window"), WINDOW_CASES)
def test_decode_attention_with_a_sliding_window_matches_the_reference(
    heads: int, kv_heads: int, dim: int, window: int, gen: torch.Generator
) -> None:
    """Position p reads the keys at p - window < j <= p: lengths 1, 100 and 160 (the cache),
    windows of 1, 7, 64, 100, 160 and 5000; batch 3 (with the workspace's splits and with 4),
    batch 1, with rotary inside the kernel (batch 1 reads ahead), and one prompt's tokens in
    one cache row (`rows`), consecutive or far apart."""
    m = check_window(heads, kv_heads, dim, window, gen)
    assert m["finite"]
    ways = ["batch3_splitsNone", "batch3_splits4", "batch1", "rope_batch1", "rope_batch3"]
    ways += ["rows", "rows_spread"]
    checked = sorted(f"{way}_vs_{ref}" for way in ways for ref in ("reference", "definition"))
    assert sorted(m["rel"]) == checked
    assert all(error < FP16_REL for error in m["rel"].values())
    assert len(m["equal"]) == 2
    assert all(m["equal"].values())  # rotary's cache writes
    assert m["window_changes_the_answer"] == (window < 160)  # 160 keys at most
