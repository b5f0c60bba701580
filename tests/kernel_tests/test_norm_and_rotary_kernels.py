"""`add_rms_norm` and `rope_and_cache` (alone, and inside `decode_attention` as a decode
step runs them) against their torch references.
"""

import pytest
import torch

from langchain_synthia import _kernels as K
from langchain_synthia._fast_model import _rotary_tables
from langchain_synthia._kernels import attention
from tests.helpers import padded, rel

pytestmark = pytest.mark.usefixtures("interpreted_kernels")

FP16_REL = 2e-3
"""‖kernel - reference‖ / ‖reference‖ for fp16 inputs (fp32 accumulation: ~5e-4 measured)."""

NORM_CASES = [(4096, True, False), (4096, False, False), (200, True, False), (200, False, False)]
NORM_CASES += [(4096, True, True), (200, True, True)]
"""(width, with a residual, x a column slice of a wider buffer as in `FastMistral.decode`)."""


ROPE_CASES = [(8, 2, 64), (4, 2, 32)]
"""(heads, kv heads, head dim) of `rope_and_cache`."""


def check_norm(n: int, residual: bool, strided: bool, gen: torch.Generator) -> dict:

    rows, eps = 3, 1e-5
    weight = (torch.rand(n, generator=gen) + 0.5).half()
    if residual:
        x = padded(rows, n, torch.float32) if strided else torch.zeros(rows, n)
        x.copy_(torch.randn(rows, n, generator=gen) * 3)  # the fp32 output of a linear layer
        res = torch.randn(rows, n, generator=gen).half()
        updated = (res.float() + x.half().float()).half()
        before = x.clone()
    else:
        x = torch.randn(rows, n, generator=gen).half()
        res, updated, before = None, x.clone(), x.clone()
    out = torch.full((rows, n), float("nan"), dtype=torch.float16)
    x_before, res_before = x.clone(), None if res is None else res.clone()
    K.add_rms_norm(x, res, weight, eps, out)
    ref = K.rms_norm_reference(updated, weight, eps)
    # the next layer's act-order input order: column j is column gather[j] (weight given so)
    gather = torch.randperm(n, generator=gen)
    gathered = torch.full((rows, n), float("nan"), dtype=torch.float16)
    res_again = None if res_before is None else res_before.clone()
    K.add_rms_norm(x_before, res_again, weight[gather], eps, gathered, gather.to(torch.int32))
    h = updated.float()
    definition = weight.float() * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    return {
        "rel_vs_reference": rel(out, ref),
        "rel_vs_definition": rel(out, definition),
        "residual_max_diff": float((res.float() - updated.float()).abs().max()) if residual else 0,
        "input_changed": bool(not torch.equal(x, before)),
        "gathered_equal": bool(torch.equal(gathered, out[:, gather])),
        "gathered_residual_equal": res is None or bool(torch.equal(res_again, res)),
    }


def check_rope(heads: int, kv_heads: int, dim: int, gen: torch.Generator) -> dict:
    """`rope_and_cache` vs `rotate` and indexed cache writes, decode-like and prefill-like."""

    max_len, cache_rows = 48, 4
    cos, sin = _rotary_tables(10000.0, dim, max_len, torch.device("cpu"))
    width = (heads + 2 * kv_heads) * dim
    results = {}
    for kind in ("decode", "prefill"):
        if kind == "decode":  # one token per cache row, each at its own position
            tokens = 3
            rows = torch.randperm(cache_rows, generator=gen)[:tokens]
            positions = torch.randint(0, max_len, (tokens,), generator=gen)
        else:  # consecutive positions of one row
            tokens = 7
            rows = torch.full((tokens,), 2)
            positions = torch.arange(5, 5 + tokens)
        qkv = padded(tokens, width, torch.float32)  # a linear layer's fp32 output, sliced
        qkv.copy_(torch.randn(tokens, width, generator=gen) * 2)
        k_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
        v_cache = torch.randn(cache_rows, max_len, kv_heads, dim, generator=gen).half()
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        fused = _fused_rope(qkv, cos, sin, positions, rows, k_cache, v_cache, kind, heads)
        h = qkv.half()
        q = h[:, : heads * dim].reshape(tokens, heads, dim)
        k = h[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)
        v = h[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        expected_q = K.rotate(q, c, s)
        expected_k[rows, positions] = K.rotate(k, c, s)
        expected_v[rows, positions] = v
        q_out = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
        K.rope_and_cache(qkv, cos, sin, positions, rows, q_out, k_cache, v_cache)
        results[kind] = {
            "q_rel": rel(q_out, expected_q),
            "k_rel": rel(k_cache, expected_k),
            "v_equal": bool(torch.equal(v_cache, expected_v)),
            "k_elsewhere_equal": bool(
                torch.equal(
                    k_cache.index_put((rows, positions), torch.zeros(1, dtype=torch.float16)),
                    expected_k.index_put((rows, positions), torch.zeros(1, dtype=torch.float16)),
                )
            ),
            **fused,
        }
    return results


def _fused_rope(qkv, cos, sin, positions, rows, k_cache, v_cache, kind: str, heads: int) -> dict:
    """A decode step's way: rotary and cache write inside `decode_attention` (`rope`), against
    `rope_and_cache` then `decode_attention`: the same caches and the same attention. Refused
    with `rows` (one prompt's tokens in one cache row, reading each other's keys)."""

    tokens, (_, max_len, kv_heads, dim) = qkv.shape[0], k_cache.shape
    lengths = (positions + 1).to(torch.int32)
    if kind == "prefill":
        work = K.AttentionWorkspace(tokens, heads, kv_heads, dim, max_len, torch.device("cpu"),
                                    shared_rows=True)  # fmt: skip
        out = torch.empty(tokens, heads, dim, dtype=torch.float16)
        try:
            K.decode_attention(qkv, k_cache.clone(), v_cache.clone(), lengths, work, out,
                               rows=rows, rope=(cos, sin))  # fmt: skip
        except ValueError as error:
            return {"fused_refused_with_rows": "rope_and_cache" in str(error)}
        return {"fused_refused_with_rows": False}
    rows = torch.arange(tokens)  # token b in cache row b, as a decode step has them
    work = K.AttentionWorkspace(tokens, heads, kv_heads, dim, max_len, torch.device("cpu"))
    two_caches, one_caches = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    q = torch.empty(tokens, heads, dim, dtype=torch.float16)
    K.rope_and_cache(qkv, cos, sin, positions, rows, q, *two_caches)
    two = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(q, *two_caches, lengths, work, two)
    one = torch.full((tokens, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(qkv, *one_caches, lengths, work, one, rope=(cos, sin))
    # a batch-1 step, whose kernel reads its first keys before it waits (`AHEAD`)
    alone = (k_cache.clone(), v_cache.clone())
    work = K.AttentionWorkspace(1, heads, kv_heads, dim, max_len, torch.device("cpu"))
    lone = torch.full((1, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(qkv[:1], *alone, lengths[:1], work, lone, rope=(cos, sin))
    two_lone = torch.full((1, heads, dim), float("nan"), dtype=torch.float16)
    K.decode_attention(q[:1], *two_caches, lengths[:1], work, two_lone)
    row0 = [cache[0] for cache in alone], [cache[0] for cache in two_caches]
    return {
        "fused_out_equal": bool(torch.equal(one, two)),
        "fused_caches_equal": all(map(torch.equal, one_caches, two_caches)),
        "fused_caches_written": not torch.equal(one_caches[0], k_cache),
        "batch1_reads_ahead": attention._attention_launch(1, True)["AHEAD"],
        "fused_batch1_out_equal": bool(torch.equal(lone, two_lone)),
        "fused_batch1_cache_equal": all(map(torch.equal, *row0)),
    }


@pytest.mark.parametrize(("n", "residual", "strided"), NORM_CASES)
def test_add_rms_norm_updates_the_residual_and_normalises(
    n: int, residual: bool, strided: bool, gen: torch.Generator
) -> None:
    m = check_norm(n, residual, strided, gen)
    assert m["residual_max_diff"] == 0  # fp16(residual + fp16(x)), bit for bit
    assert m["rel_vs_reference"] < FP16_REL
    assert m["rel_vs_definition"] < FP16_REL
    assert not m["input_changed"]
    assert m["gathered_equal"]  # written in the next layer's act-order input order
    assert m["gathered_residual_equal"]


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), ROPE_CASES)
def test_rope_and_cache_rotates_and_writes_only_its_cache_rows(
    heads: int, kv_heads: int, dim: int, gen: torch.Generator
) -> None:
    """Decode-like (one token per row, scattered positions) and prefill-like (one row) calls;
    and the same inside `decode_attention` (``rope``), as a decode step runs it."""
    m = check_rope(heads, kv_heads, dim, gen)
    assert sorted(m) == ["decode", "prefill"]
    for part in m.values():
        assert part["q_rel"] < FP16_REL
        assert part["k_rel"] < FP16_REL
        assert part["v_equal"]
        assert part["k_elsewhere_equal"]
    # a decode step rotates and writes inside `decode_attention`: the same, to the bit
    assert m["decode"]["fused_caches_written"]
    assert m["decode"]["fused_caches_equal"]
    assert m["decode"]["fused_out_equal"]
    assert m["decode"]["batch1_reads_ahead"]  # so the next two check that way
    assert m["decode"]["fused_batch1_out_equal"]
    assert m["decode"]["fused_batch1_cache_equal"]
    # not for one prompt's tokens in one row: another program may write a key read here
    assert m["prefill"]["fused_refused_with_rows"]
