"""The fast engine's Triton kernels against their torch references, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which must be on before
Triton is imported, so they run in subprocesses (`_kernel_checks`) on fresh random inputs; the
seed is in every failure message (rerun one case with ``TRITON_INTERPRET=1 python -m
tests.integration_tests._kernel_checks --seed SEED``). The GPTQ repacking is checked here
directly, against the format's definition.
"""

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from langchain_synthia._gptq import (
    pack_gptq,
    pack_rows,
    pack_words,
    permute_columns,
    sort_rows,
    unpack_rows,
    unpack_words,
    word_slots,
)
from tests.conftest import tiny_model_path
from tests.integration_tests._kernel_checks import (
    case_names,
    dequantize_reference,
    group_index,
    random_gptq,
)

ROOT = Path(__file__).resolve().parents[2]
FP16_REL = 2e-3
"""‖kernel - reference‖ / ‖reference‖ for fp16 inputs (fp32 accumulation: ~5e-4 measured)."""
MODEL_REL = 1e-2
"""The same for a whole network's logits (fp16 rounding compounds over layers: ~1e-3)."""
SHARDS = 2


WINDOW_SEED = 23
"""The sliding-window cases' seed (fixed: the same inputs on every run)."""
PAGED_SEED = 16
"""The paged-cache cases' seed (fixed: the same inputs on every run)."""


def _run_cases(seed: int, *options: str) -> tuple[int, dict[str, dict]]:
    """Run the kernel cases (in parallel shards); map case name -> its JSON line."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "tests.integration_tests._kernel_checks", "--seed", str(seed)]
    command += list(options)
    shards = [
        subprocess.Popen(
            [*command, "--shard", f"{shard}/{SHARDS}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for shard in range(SHARDS)
    ]
    results: dict[str, dict] = {}
    for process in shards:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"seed {seed}: kernel checks crashed\n{err[-4000:]}"
        for line in out.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                results[entry["case"]] = entry
    return seed, results


@pytest.fixture(scope="module")
def kernel_runs() -> tuple[int, dict[str, dict]]:
    """Every kernel case but the sliding window's and the paged cache's, once, on a fresh seed."""
    seed = int.from_bytes(os.urandom(3), "little")
    options = ("--tiny", tiny_model_path(), "--skip", "window-", "--skip", "paged-")
    return _run_cases(seed, *options)


@pytest.fixture(scope="module")
def window_runs() -> tuple[int, dict[str, dict]]:
    """The sliding-window cases of `decode_attention`, once, on `WINDOW_SEED`."""
    return _run_cases(WINDOW_SEED, "--only", "window-")


@pytest.fixture(scope="module")
def paged_runs() -> tuple[int, dict[str, dict]]:
    """The paged-cache cases of `decode_attention` and `rope_and_cache`, once, on `PAGED_SEED`."""
    return _run_cases(PAGED_SEED, "--only", "paged-")


def metrics_of(kernel_runs: tuple[int, dict[str, dict]], case: str) -> tuple[str, dict]:
    seed, results = kernel_runs
    assert case in results, f"seed {seed}: case {case} did not run"
    entry = results[case]
    assert "error" not in entry, f"seed {seed}: {case} raised\n{entry.get('error')}"
    return f"seed {seed}, {case}: {entry['metrics']}", entry["metrics"]


def cases(prefix: str) -> list[str]:
    return [name for name in case_names() if name.startswith(prefix)]


# -- GPTQ linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("linear-"))
def test_gptq_linear_matches_the_reference(kernel_runs, case: str) -> None:
    """Bits 4/8, group sizes 32/64/128/one group, act order, 1 to 100 rows (all three paths)."""
    where, m = metrics_of(kernel_runs, case)
    assert m["rel_vs_reference"] < FP16_REL, where
    assert m["rel_vs_definition"] < FP16_REL, where
    assert m["outside_written"] == 0, where  # `out` is a column slice: its neighbours untouched
    assert m["has_perm"] == (case.endswith("-act") and "-g-1-" not in case), where


@pytest.mark.parametrize("case", cases("gemv-"))
def test_batch1_gemv_matches_the_reference(kernel_runs, case: str) -> None:
    """The fp32 path of `gemv` (the interpreter cannot run its fp16x2 PTX: the bench checks
    that one on a GPU, against Marlin and transformers)."""
    where, m = metrics_of(kernel_runs, case)
    assert m["fits"], where
    assert m["rel_vs_reference"] < FP16_REL, where
    assert m["rel_vs_definition"] < FP16_REL, where
    assert m["rel_one_step_vs_reference"] < FP16_REL, where  # no step ahead: the other path
    assert m["outside_written"] == 0, where


@pytest.mark.parametrize("case", cases("gated-"))
def test_gated_gptq_linear_applies_silu_gate_times_up(kernel_runs, case: str) -> None:
    where, m = metrics_of(kernel_runs, case)
    assert m["rel_vs_reference"] < FP16_REL, where
    assert m["rel_vs_definition"] < FP16_REL, where
    assert m["silu_mul_rel"] < 1e-3, where  # fp16 rounding of the same two steps
    assert m["silu_mul_fp16_rows"], where


@pytest.mark.parametrize("case", cases("fused-"))
def test_fused_layers_equal_each_layer_alone(kernel_runs, case: str) -> None:
    where, m = metrics_of(kernel_runs, case)
    assert m["splits"] == [200, 64, 96], where
    assert m["out_features"] == 360, where
    assert len(m["rel_per_layer"]) == 3, where
    assert all(error < FP16_REL for error in m["rel_per_layer"]), where


# -- attention, norm, the whole network ----------------------------------------------------------


@pytest.mark.parametrize("case", cases("attention-"))
def test_decode_attention_matches_the_reference(kernel_runs, case: str) -> None:
    """Batch 3 with lengths 1, 1000 and 2100 (ragged, not block multiples), GQA and MHA."""
    where, m = metrics_of(kernel_runs, case)
    assert m["finite"], where
    assert m["scattered_equal"], where  # written straight into o_proj's act-order input order
    assert m["rel_vs_reference"] < FP16_REL, where
    assert m["rel_vs_definition"] < FP16_REL, where
    assert sorted(int(length) for length in m["rel_per_row"]) == [1, 1000, 2100], where
    assert all(error < FP16_REL for error in m["rel_per_row"].values()), where
    # `rows`: each query reads the cache row it is given (a prompt's rest after a prefix)
    assert m["rel_routed_vs_reference"] < FP16_REL, where
    assert m["rel_routed_vs_definition"] < FP16_REL, where
    assert m["routed_differs_from_own_rows"], where
    assert m["rel_four_splits_vs_reference"] < FP16_REL, where


@pytest.mark.parametrize("case", cases("window-"))
def test_decode_attention_with_a_sliding_window_matches_the_reference(
    window_runs, case: str
) -> None:
    """Position p reads the keys at p - window < j <= p: lengths 1, 100 and 160 (the cache),
    windows of 1, 7, 64, 100, 160 and 5000; batch 3 (with the workspace's splits and with 4),
    batch 1, with rotary inside the kernel (batch 1 reads ahead), and one prompt's tokens in
    one cache row (`rows`), consecutive or far apart."""
    where, m = metrics_of(window_runs, case)
    window = int(case.split("-")[1][1:])
    assert m["finite"], where
    ways = ["batch3_splitsNone", "batch3_splits4", "batch1", "rope_batch1", "rope_batch3"]
    ways += ["rows", "rows_spread"]
    checked = sorted(f"{way}_vs_{ref}" for way in ways for ref in ("reference", "definition"))
    assert sorted(m["rel"]) == checked, where
    assert all(error < FP16_REL for error in m["rel"].values()), where
    assert len(m["equal"]) == 2, where
    assert all(m["equal"].values()), where  # rotary's cache writes
    assert m["window_changes_the_answer"] == (window < 160), where  # 160 keys at most


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


@pytest.mark.parametrize("case", cases("paged-"))
def test_paged_kv_cache_is_read_and_written_through_block_tables(paged_runs, case: str) -> None:
    """Caches of blocks of 16 positions, each row's blocks dealt from a shuffled shared pool
    (rows interleaved), tables wider than needed (-1, or past the pool, in unused entries and in
    blocks wholly before the sliding window), every slot no row holds NaN; lengths 1, 15, 16,
    17 and 53. Decode steps (GQA and MHA, 8 and 4 key splits), into o_proj's scattered order,
    one prompt's tokens in one table row (`rows`, per-block tiles), rotary inside the kernel
    (batch 1 reading ahead, batch 5), a window of 24, and `rope_and_cache` (decode-like and
    prefill-like): each against `decode_attention_reference` with the same tables, and the
    attention bit for bit against the kernel on the same keys one row a request."""
    where, m = metrics_of(paged_runs, case)
    way = case.split("-h")[0].removeprefix("paged-")
    rel_names, equal_names = PAGED_NAMES[way]
    assert m["finite"], where
    assert sorted(m["rel"]) == sorted(rel_names), where
    assert all(error < FP16_REL for error in m["rel"].values()), where
    assert sorted(m["equal"]) == sorted(equal_names), where
    assert all(m["equal"].values()), where


@pytest.mark.parametrize("case", cases("norm-"))
def test_add_rms_norm_updates_the_residual_and_normalises(kernel_runs, case: str) -> None:
    where, m = metrics_of(kernel_runs, case)
    assert m["residual_max_diff"] == 0, where  # fp16(residual + fp16(x)), bit for bit
    assert m["rel_vs_reference"] < FP16_REL, where
    assert m["rel_vs_definition"] < FP16_REL, where
    assert not m["input_changed"], where
    assert m["gathered_equal"], where  # written in the next layer's act-order input order
    assert m["gathered_residual_equal"], where


@pytest.mark.parametrize("case", cases("rope-"))
def test_rope_and_cache_rotates_and_writes_only_its_cache_rows(kernel_runs, case: str) -> None:
    """Decode-like (one token per row, scattered positions) and prefill-like (one row) calls;
    and the same inside `decode_attention` (``rope``), as a decode step runs it."""
    where, m = metrics_of(kernel_runs, case)
    assert sorted(m) == ["decode", "prefill"], where
    for part in m.values():
        assert part["q_rel"] < FP16_REL, where
        assert part["k_rel"] < FP16_REL, where
        assert part["v_equal"], where
        assert part["k_elsewhere_equal"], where
    # a decode step rotates and writes inside `decode_attention`: the same, to the bit
    assert m["decode"]["fused_caches_written"], where
    assert m["decode"]["fused_caches_equal"], where
    assert m["decode"]["fused_out_equal"], where
    assert m["decode"]["batch1_reads_ahead"], where  # so the next two check that way
    assert m["decode"]["fused_batch1_out_equal"], where
    assert m["decode"]["fused_batch1_cache_equal"], where
    # not for one prompt's tokens in one row: another program may write a key read here
    assert m["prefill"]["fused_refused_with_rows"], where


def test_network_on_the_kernels_matches_the_network_on_the_references(kernel_runs) -> None:
    """`FastMistral` (tiny checkpoint) with the kernels vs the references: 3 rows, 3 steps."""
    where, m = metrics_of(kernel_runs, "model")
    assert len(m["rel_prefill"]) == 3, where
    assert all(error < MODEL_REL for error in m["rel_prefill"]), where
    steps = m["rel_decode_per_step_and_row"]
    assert len(steps) == 3, where
    assert all(error < MODEL_REL for step in steps for error in step), where
    assert m["argmax_agrees"], where


# -- GPTQ repacking (plain torch) ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_rows_and_unpack_rows_are_inverse(bits: int) -> None:
    pack = 32 // bits
    words = torch.randint(-(2**31), 2**31, (64 // pack, 48), dtype=torch.int64).to(torch.int32)
    codes = unpack_rows(words, bits)
    assert codes.shape == (64, 48)
    assert torch.equal(pack_rows(codes, bits), words)
    # row k sits in bits [bits * (k % pack), bits * (k % pack + 1)) of word k // pack
    k = torch.arange(64)
    expected = (words.to(torch.int64)[k // pack] >> (bits * (k % pack))[:, None]) & (2**bits - 1)
    assert torch.equal(codes.to(torch.int64), expected)
    random_codes = torch.randint(0, 2**bits, (64, 48), dtype=torch.uint8)
    assert torch.equal(unpack_rows(pack_rows(random_codes, bits), bits), random_codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_words_puts_even_rows_low_and_odd_rows_high(bits: int) -> None:
    """`PackedLinear`'s order: row ``2j`` of a word in slot ``j``, row ``2j + 1`` in slot
    ``j + pack / 2``; 4-bit: nibbles j and j+4 (one fp16x2 in the GEMV) are rows 2j, 2j+1."""
    pack = 32 // bits
    codes = torch.randint(0, 2**bits, (64, 48), dtype=torch.uint8)
    words = pack_words(codes, bits)
    assert torch.equal(unpack_words(words, bits), codes)
    slots = torch.tensor(word_slots(bits))
    assert sorted(slots.tolist()) == list(range(pack))
    k = torch.arange(64)
    stored = (words.to(torch.int64)[k // pack] >> (bits * slots[k % pack])[:, None]) & (2**bits - 1)
    assert torch.equal(stored, codes.to(torch.int64))
    if bits == 4:
        assert word_slots(4) == [0, 4, 1, 5, 2, 6, 3, 7]
        row = torch.arange(8, dtype=torch.uint8)[:, None]
        assert pack_words(row, 4).item() & 0xFFFFFFFF == 0x75316420


def _assert_dequantized(weight: torch.Tensor, layer: dict[str, torch.Tensor], bits: int) -> None:
    """fp16 rounding of ``W`` and of ``zero * scale`` is the only difference allowed."""
    expected = dequantize_reference(layer, bits)
    scales = layer["scales"][layer["g_idx"].long()].float()
    bound = 2.0**-11 * (expected.abs() + 2**bits * scales) + 1e-7
    assert weight.dtype == torch.float16
    assert weight.shape == expected.shape
    assert bool(((weight.float() - expected).abs() <= bound).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("act_order", [True, False])
def test_dequantize_follows_the_gptq_definition(bits: int, group: int, act_order: bool) -> None:
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(3), "little"))
    layer = random_gptq(256, 96, bits, group, generator=generator, act_order=act_order)
    packed = pack_gptq([layer], bits, group)
    assert packed.group_size == (256 if group == -1 else group)
    assert (packed.in_features, packed.out_features, packed.splits) == (256, 96, ())
    _assert_dequantized(packed.dequantize(), layer, bits)


def test_fused_dequantize_is_the_layers_side_by_side() -> None:
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(3), "little"))
    g_idx = group_index(256, 32, act_order=True, generator=generator)
    layers = [random_gptq(256, n, 4, 32, generator=generator, g_idx=g_idx) for n in (64, 32, 32)]
    packed = pack_gptq(layers, 4, 32)
    assert packed.splits == (64, 32, 32)
    weight = packed.dequantize()
    for layer, part in zip(layers, weight.split(list(packed.splits), dim=1), strict=True):
        _assert_dequantized(part, layer, 4)


def test_pack_gptq_refuses_layouts_it_cannot_read() -> None:
    generator = torch.Generator().manual_seed(0)
    a = random_gptq(256, 64, 4, 32, generator=generator)
    b = random_gptq(256, 64, 4, 32, generator=generator)  # its own act-order permutation
    with pytest.raises(ValueError, match="share their act-order row permutation"):
        pack_gptq([a, b], 4, 32)
    with pytest.raises(ValueError, match="does not form groups of 64 rows"):
        pack_gptq([a], 4, 64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, -1])
def test_sorted_rows_compute_the_layer_from_the_input_in_their_order(bits: int, group: int) -> None:
    """`sort_rows`: plain groups, and ``x[:, perm] @ W'`` is exactly ``x @ W``."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(3), "little"))
    g_idx = group_index(256, group, act_order=True, generator=generator)
    layers = [random_gptq(256, n, bits, group, generator=generator, g_idx=g_idx) for n in (64, 32)]
    sorted_layers, perm = sort_rows(layers, bits, group)
    if group == -1:  # one group: any row order is already "sorted"
        assert perm is None
        assert sorted_layers == layers
        return
    assert perm is not None
    assert sorted(perm.tolist()) == list(range(256))
    for layer, done in zip(layers, sorted_layers, strict=True):
        assert torch.equal(done["g_idx"].long(), torch.arange(256) // group)
        assert torch.equal(done["scales"], layer["scales"])
        weight = dequantize_reference(layer, bits)
        assert torch.equal(dequantize_reference(done, bits), weight[perm])
    other = random_gptq(256, 32, bits, group, generator=generator)  # its own row order
    with pytest.raises(ValueError, match="share their act-order row permutation"):
        sort_rows([layers[0], other], bits, group)


@pytest.mark.parametrize("bits", [4, 8])
def test_permuted_columns_are_the_outputs_in_that_order(bits: int) -> None:
    """`permute_columns`: output ``n`` is the original output ``order[n]`` (zero points too)."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(3), "little"))
    layer = random_gptq(256, 96, bits, 32, generator=generator)
    order = torch.randperm(96, generator=generator)
    done = permute_columns(layer, order, bits)
    weight = dequantize_reference(layer, bits)
    assert torch.equal(dequantize_reference(done, bits), weight[:, order])
    assert torch.equal(done["g_idx"], layer["g_idx"])


# -- programmatic dependent launch ---------------------------------------------------------------

PDL_KERNELS = {  # kernel (the function under an autotuner), its constants, pointers not fp16
    "_silu_mul_kernel": ({"BLOCK": 1024}, {"x_ptr": "*fp32"}),
    "_gemv_kernel": (
        {"K": 4096, "GROUP": 128, "WORDS": 16, "HALF2": True, "BLOCK_N": 512, "SPLIT": 32},
        {"w_ptr": "*i32", "out_ptr": "*fp32"},
    ),
    "_decode_attention_kernel": (
        dict(
            SPLIT_LEN=128,
            GROUP=4,
            GROUP_PAD=16,
            HEAD_DIM=128,
            BLOCK_S=64,
            SPLITS=32,
            HAS_ROWS=False,
            PER_BLOCK=1,
            ROPE=True,
            PAGE=16,
            AHEAD=True,
        ),
        {
            "q_ptr": "*fp32",
            "lengths_ptr": "*i32",
            "rows_ptr": "*i32",
            "tables_ptr": "*i32",
            "acc_ptr": "*fp32",
            "stats_ptr": "*fp32",
        },
    ),
    "_combine_kernel": (
        {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "SPLITS": 32, "HAS_SCATTER": True},
        {"acc_ptr": "*fp32", "stats_ptr": "*fp32", "scatter_ptr": "*i32"},
    ),
    "_add_rms_norm_kernel": (
        {"HAS_RESIDUAL": True, "HAS_GATHER": True, "BLOCK": 4096},
        {"gather_ptr": "*i32"},
    ),
    "_rope_cache_kernel": (
        {"HEADS": 32, "KV_HEADS": 8, "HEAD_DIM": 128, "PAGE": 16},
        {
            "cos_ptr": "*fp32",
            "sin_ptr": "*fp32",
            "positions_ptr": "*i32",
            "rows_ptr": "*i32",
            "tables_ptr": "*i32",
        },
    ),
}
KERNEL_FAMILIES = {
    "_silu_mul_kernel": "activation",
    "_gemv_kernel": "decode_gemv",
    "_decode_attention_kernel": "attention",
    "_combine_kernel": "attention",
    "_add_rms_norm_kernel": "norms",
    "_rope_cache_kernel": "rotary",
}
"""The module of ``langchain_synthia._kernels`` that defines each of `PDL_KERNELS`."""
PAGED_KERNELS = ("_decode_attention_kernel", "_rope_cache_kernel")
"""Kernels compiled both ways: through block tables (``PAGED``) and one cache row a block."""


READ_EARLY = {
    "_gemv_kernel": ("w_ptr", "s_ptr", "z_ptr"),
    "_add_rms_norm_kernel": ("w_ptr", "gather_ptr"),
    "_decode_attention_kernel": ("lengths_ptr", "tables_ptr", "k_ptr", "v_ptr"),
}
"""Kernels that load some of their pointers' data before they wait: weights and orders, never
written; with rotary, the attention's lengths, block tables and cached keys and values, which
the step's kernels write only after their wait (the step's own k and v: `decode_attention`)."""


def _addressed_from(body: str, kernel, params: tuple[str, ...]) -> set[str]:
    """Registers of a straight-line PTX `body` whose value derives from the kernel's `params`."""
    names = [p.name for p in kernel.params if not p.is_constexpr]
    tainted: set[str] = set()
    sources = {f"_param_{names.index(p)}]" for p in params}
    for line in body.splitlines():
        line = re.sub(r"^\s*@!?%p\d+\s+", "", line)  # a masked load's value derives as well
        registers = re.findall(r"%[a-z]+\d+", line)
        if not registers or line.lstrip().startswith(("//", "st.", "red.", "atom.")):
            continue
        if any(s in line for s in sources) or any(r in tainted for r in registers[1:]):
            tainted.add(registers[0])
    return tainted


@pytest.mark.parametrize("name", PDL_KERNELS)
def test_decode_step_kernels_wait_for_the_kernel_before_under_pdl(name: str) -> None:
    """Compiled for a Hopper card (sm_90, no GPU needed), with `PDL` each kernel waits for the
    kernel before (``griddepcontrol.wait``) before it reads anything that kernel may write,
    and lets the next one start before that wait; without it, neither instruction is there.
    Only `READ_EARLY`'s kernels read ahead of the wait, and only what the kernels before them
    never write: every load there is addressed from the pointers listed there. The attention
    and rotary kernels are checked through block tables (``PAGED``) and without."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from langchain_synthia._kernels import decode_gemv

    family = importlib.import_module(f"langchain_synthia._kernels.{KERNEL_FAMILIES[name]}")
    kernel = getattr(family, name)
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    constants, pointers = PDL_KERNELS[name]
    if name == "_gemv_kernel":
        constants = {**constants, "ASM": decode_gemv._WORDS_DOT}
    variants = [{"PAGED": True}, {"PAGED": False}] if name in PAGED_KERNELS else [{}]
    for pdl, variant in itertools.product((True, False), variants):
        values = {**constants, **variant, "PDL": pdl}
        signature = {
            arg: "constexpr" if arg in values
            else pointers.get(arg, "*fp16") if arg.endswith("_ptr")
            else "fp32" if arg in ("scale", "eps") else "i32"
            for arg in kernel.arg_names
        }  # fmt: skip
        source = ASTSource(fn=kernel, signature=signature, constexprs=values)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": pdl, "num_warps": 4}
        )
        ptx = compiled.asm["ptx"]
        body = ptx[ptx.index(".entry") :]
        wait, launch = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dep")
        if pdl:
            assert wait >= 0
            assert 0 <= launch < wait  # the next kernel may start before this one waits
            ahead = [line for line in body[:wait].splitlines() if "ld.global" in line]
            if name not in READ_EARLY:
                assert not ahead, f"{name} reads before it waits"
                continue
            assert ahead, f"{name} loads no weights ahead of the wait"
            early = _addressed_from(body[:wait], kernel, READ_EARLY[name])
            for line in ahead:
                address = re.search(r"\[\s*(%[a-z]+\d+)", line).group(1)
                assert address in early, f"{name} reads an activation before it waits: {line}"
            assert not re.search(r"\b(red|atom|st)\.global", body[:wait])
        else:
            assert wait == launch == -1


PAGED_ATTENTION_VARIANTS = {
    "rope-ahead": ({"HAS_ROWS": False, "PER_BLOCK": 1, "ROPE": True, "AHEAD": True}, "*fp32"),
    "rows": ({"HAS_ROWS": True, "PER_BLOCK": 4, "ROPE": False, "AHEAD": False}, "*fp16"),
}
"""A batch-1 decode step's attention (q from the fp32 q/k/v projection), and one prompt's
tokens in one table row (fp16 q): constants and q's type."""


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_paged_decode_attention_compiles_for_each_gpu_generation(arch: int) -> None:
    """The attention kernel through block tables compiles to a cubin for Ampere (sm_80/86),
    Ada (sm_89) and Hopper (sm_90), no GPU needed; the table is read with 32-bit loads there
    and not without tables."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from langchain_synthia._kernels import attention

    kernel = attention._decode_attention_kernel
    constants, pointers = PDL_KERNELS["_decode_attention_kernel"]
    tables = [p.name for p in kernel.params if not p.is_constexpr].index("tables_ptr")
    ways = itertools.product(PAGED_ATTENTION_VARIANTS.values(), (True, False))
    for (variant, q_type), paged in ways:
        values = {**constants, **variant, "PAGED": paged, "PDL": False}
        types = {**pointers, "q_ptr": q_type}
        signature = {
            arg: "constexpr" if arg in values
            else types.get(arg, "*fp16") if arg.endswith("_ptr")
            else "fp32" if arg == "scale" else "i32"
            for arg in kernel.arg_names
        }  # fmt: skip
        source = ASTSource(fn=kernel, signature=signature, constexprs=values)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"], (arch, variant)
        ptx = compiled.asm["ptx"]
        assert (f"_param_{tables}]" in ptx) == paged, (arch, variant, paged)
