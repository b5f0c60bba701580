"""Cold sweep of the batch-1 GEMV (`langchain_synthia._kernels.gemv`) against Marlin.

Each Mistral-7B layer shape is timed as a decode step meets it: one call on each of 32
different copies of the layer in a CUDA graph, so every call reads its weights from memory
(repeating one layer's call would serve them from the L2 cache: o_proj's 8.4 MB fits in an
H100's 50 MB). Every configuration of `CONFIGS` is tried; prints, per shape, Marlin's time and
the best configurations, and writes ``$OUT/gemv_sweep.json``.

    python bench/gemv_sweep.py   (with gptqmodel installed, on a GPU)
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_probe import SHAPES

from bench import _gptq_tensors
from langchain_synthia._gptq import pack_gptq, sort_rows
from langchain_synthia._kernels import decode_gemv
from langchain_synthia._linear import MarlinLinear, graph_us

COPIES = 32
CONFIGS = [
    (block_n, split, warps)
    for block_n in (128, 256, 512, 1024)
    for split in (1, 2, 4, 7, 8, 14, 16, 28, 32, 56)
    for warps in (2, 4, 8)
]


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    results: dict = {}
    for name, (k, n) in SHAPES.items():
        perm = torch.randperm(k, device="cuda", generator=gen)
        part = {key: v.cuda() for key, v in _gptq_tensors(k, n, 4, 128, perm, gen).items()}
        (part,), _ = sort_rows([part], 4, 128)
        layers = [MarlinLinear([part], 4, 128, dense=True) for _ in range(COPIES)]
        packed = [layer.dense for layer in layers]
        x = torch.randn(1, k, dtype=torch.float16, device="cuda")
        out = torch.zeros(1, n, device="cuda")
        ref = x.float() @ pack_gptq([part], 4, 128).dequantize().float()
        marlin = graph_us(lambda layers=layers: [lay(x) for lay in layers], calls=1) / COPIES
        results[f"{name}/marlin"] = round(marlin, 2)
        timed = []
        for block_n, split, warps in CONFIGS:
            if n % block_n or k % (128 * split):
                continue

            def call(p, block_n=block_n, split=split, warps=warps):
                decode_gemv._gemv_kernel.fn[(n // block_n, split)](
                    x, p.qweight, p.scales, p.zeros, out, k, n, GROUP=128, WORDS=16,
                    HALF2=True, ASM=decode_gemv._WORDS_DOT, BLOCK_N=block_n, SPLIT=split, PDL=False,
                    num_warps=warps,
                )  # fmt: skip

            try:
                out.zero_()
                call(packed[0])
                err = float((out - ref).norm() / ref.norm())
                us = graph_us(lambda c=call, ps=packed: [c(p) for p in ps], calls=1) / COPIES
            except Exception as error:  # a configuration that does not compile or launch
                results[f"{name}/n{block_n}/s{split}/w{warps}"] = {"error": repr(error)[-200:]}
                continue
            label = f"n{block_n}/s{split}/w{warps}"
            results[f"{name}/{label}"] = {"us": round(us, 2), "rel_err": round(err, 5)}
            timed.append((us, label))
        timed.sort()
        print(f"{name:8s} marlin {marlin:6.2f} µs; ours best:",
              ", ".join(f"{label} {us:.2f}" for us, label in timed[:5]), flush=True)  # fmt: skip
    with open(os.path.join(os.environ.get("OUT", "."), "gemv_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
