"""The decode-step kernels compiled for GPU architectures (no GPU needed): programmatic dependent
launch's wait comes before anything the kernels before may write is read, and the paged
attention compiles for every supported generation.

The compiler runs in a process of its own (`tests.kernel_tests._compile`): a CPU test run has
Triton's interpreter on, which cannot compile.
"""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def _pdl_jobs(name: str) -> list[dict[str, Any]]:
    """`name` compiled for sm_90 with and without `PDL` (and with and without block tables)."""
    constants, pointers = PDL_KERNELS[name]
    variants = [{"PAGED": True}, {"PAGED": False}] if name in PAGED_KERNELS else [{}]
    return [
        {
            "kernel": name, "family": KERNEL_FAMILIES[name], "arch": 90, "pointers": pointers,
            "constants": {**constants, **variant, "PDL": pdl},
            "options": {"launch_pdl": pdl, "num_warps": 4},
        }
        for pdl, variant in itertools.product((True, False), variants)
    ]  # fmt: skip


PAGED_ATTENTION_VARIANTS = {
    "rope-ahead": ({"HAS_ROWS": False, "PER_BLOCK": 1, "ROPE": True, "AHEAD": True}, "*fp32"),
    "rows": ({"HAS_ROWS": True, "PER_BLOCK": 4, "ROPE": False, "AHEAD": False}, "*fp16"),
}
"""A batch-1 decode step's attention (q from the fp32 q/k/v projection), and one prompt's
tokens in one table row (fp16 q): constants and q's type."""


ARCHS = [80, 86, 89, 90]
"""Ampere (sm_80/86), Ada (sm_89) and Hopper (sm_90)."""


def _arch_jobs(arch: int) -> list[dict[str, Any]]:
    """The attention kernel for `arch`, each of `PAGED_ATTENTION_VARIANTS`, with tables and not."""
    constants, pointers = PDL_KERNELS["_decode_attention_kernel"]
    return [
        {
            "kernel": "_decode_attention_kernel", "family": "attention", "arch": arch,
            "pointers": {**pointers, "q_ptr": q_type}, "options": {},
            "constants": {**constants, **variant, "PAGED": paged, "PDL": False},
        }
        for (variant, q_type), paged in itertools.product(
            PAGED_ATTENTION_VARIANTS.values(), (True, False)
        )
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Every job of this module, compiled in one child process: jobs and results by test case."""
    pytest.importorskip("triton")
    cases = {name: _pdl_jobs(name) for name in PDL_KERNELS}
    cases |= {f"sm_{arch}": _arch_jobs(arch) for arch in ARCHS}
    jobs = [job for case in cases.values() for job in case]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernel_tests._compile"],
        input=json.dumps(jobs), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = iter(json.loads(done.stdout))
    return {case: [(job, next(results)) for job in case_jobs] for case, case_jobs in cases.items()}


def _addressed_from(body: str, names: list[str], params: tuple[str, ...]) -> set[str]:
    """Registers of a straight-line PTX `body` whose value derives from the kernel's `params`."""
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
def test_decode_step_kernels_wait_for_the_kernel_before_under_pdl(compiled, name: str) -> None:
    """Compiled for a Hopper card (sm_90), with `PDL` each kernel waits for the kernel before
    (``griddepcontrol.wait``) before it reads anything that kernel may write, and lets the
    next one start before that wait; without it, neither instruction is there. Only
    `READ_EARLY`'s kernels read ahead of the wait, and only what the kernels before them never
    write: every load there is addressed from the pointers listed there. The attention and
    rotary kernels are checked through block tables (``PAGED``) and without."""
    for job, result in compiled[name]:
        ptx = result["ptx"]
        body = ptx[ptx.index(".entry") :]
        wait, launch = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dep")
        if not job["constants"]["PDL"]:
            assert wait == launch == -1
            continue
        assert wait >= 0
        assert 0 <= launch < wait  # the next kernel may start before this one waits
        ahead = [line for line in body[:wait].splitlines() if "ld.global" in line]
        if name not in READ_EARLY:
            assert not ahead, f"{name} reads before it waits"
            continue
        assert ahead, f"{name} loads no weights ahead of the wait"
        early = _addressed_from(body[:wait], result["params"], READ_EARLY[name])
        for line in ahead:
            address = re.search(r"\[\s*(%[a-z]+\d+)", line).group(1)
            assert address in early, f"{name} reads an activation before it waits: {line}"
        assert not re.search(r"\b(red|atom|st)\.global", body[:wait])


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_decode_attention_compiles_for_each_gpu_generation(compiled, arch: int) -> None:
    """The attention kernel through block tables compiles to a cubin for each generation; the
    table is read with 32-bit loads there and not without tables."""
    for job, result in compiled[f"sm_{arch}"]:
        assert result["cubin"], job
        tables = result["params"].index("tables_ptr")
        paged = job["constants"]["PAGED"]
        assert (f"_param_{tables}]" in result["ptx"]) == paged, job
