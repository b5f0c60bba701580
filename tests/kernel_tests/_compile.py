"""Compile the fast engine's kernels for a GPU architecture (no GPU needed) in a process of its
own: ``python -m tests.kernel_tests._compile < jobs.json``.

A CPU test run defines Triton's library and our kernels for its interpreter
(tests/conftest.py), which cannot compile; this process starts without ``TRITON_INTERPRET``.
Each job names a kernel, its family module, its constants and pointer types, the architecture
and the compile options; the answer, one JSON list on stdout, gives each job's PTX, whether a
cubin came out, and the kernel's parameters that are not constants, in order.
"""

import importlib
import json
import sys
from typing import Any


def compile_kernel(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one job (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from langchain_synthia._kernels import decode_gemv

    family = importlib.import_module(f"langchain_synthia._kernels.{job['family']}")
    kernel = getattr(family, job["kernel"])
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    values = dict(job["constants"])
    if job["kernel"] == "_gemv_kernel":
        values["ASM"] = decode_gemv._WORDS_DOT
    pointers = job["pointers"]
    signature = {
        arg: "constexpr" if arg in values
        else pointers.get(arg, "*fp16") if arg.endswith("_ptr")
        else "fp32" if arg in ("scale", "eps") else "i32"
        for arg in kernel.arg_names
    }  # fmt: skip
    source = ASTSource(fn=kernel, signature=signature, constexprs=values)
    target = GPUTarget("cuda", job["arch"], 32)
    compiled = triton.compile(source, target=target, options=job["options"])
    return {
        "ptx": compiled.asm["ptx"],
        "cubin": bool(compiled.asm["cubin"]),
        "params": [p.name for p in kernel.params if not p.is_constexpr],
    }


if __name__ == "__main__":
    print(json.dumps([compile_kernel(job) for job in json.load(sys.stdin)]))
