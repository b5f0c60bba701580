"""Kernel probe: one GPTQ act-order layer of each Mistral-7B shape, timed per call inside a CUDA
graph (no launch overhead), for gptqmodel's Marlin with act order, Marlin on rows sorted by
group once (what the fast engine runs), cuBLAS on the fp16 weight and on a weight dequantised
at each call (the prefill alternatives: ``--impls cublas``), our Triton GEMV of ``gemv4.py`` in
every configuration of `GEMV4` (``--impls gemv4``, one row; the best of each kind is printed),
and GemLite (``pip install gemlite``; optional, a failing kernel is reported and skipped). Prints µs, GB/s and the error against the
dequantised reference; writes ``$OUT/kernel_probe_<bits>b_g<group>.json``.

    python bench/kernel_probe.py [--bits 4] [--group 128] [--rows 1 2 4 8 16 32]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench import _gptq_tensors
from langchain_synthia._gptq import pack_gptq, pack_rows, unpack_words

PRESORTED = ("gemv4", "gemlite", "marlin_sorted", "dequant+cublas", "cublas_fp16")
GEMV4 = [  # our batch-1 GEMV's configurations: (block_n, block_k, split, half2)
    (block_n, block_k, split, half2)
    for half2 in (True, False)
    for block_n in (32, 64, 128)
    for block_k in (128, 256, 512)
    for split in (1, 2, 4, 8, 16)
]
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def graph_time(fn, x, calls=20, replays=20) -> float:
    """µs a call of ``fn(x)`` takes, inside a CUDA graph (the engine's own timer)."""
    from langchain_synthia._linear import graph_us

    return graph_us(lambda: fn(x), calls=calls, replays=replays)


def marlin(part, bits, group):
    from langchain_synthia._linear import MarlinLinear

    return MarlinLinear([part], bits, group)


def marlin_plain(qweight, qzeros, scales, bits, group, k, n):
    """Marlin without act order, on rows already sorted by group."""
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear
    from gptqmodel.utils.backend import BACKEND

    module = MarlinLinear(
        bits=bits,
        group_size=group,
        desc_act=False,
        sym=True,
        in_features=k,
        out_features=n,
        bias=False,
        backend=BACKEND.GPTQ_MARLIN,
    ).cuda()
    module.qweight.data = qweight.contiguous()
    module.qzeros.data = qzeros.contiguous()
    module.scales.data = scales.half().contiguous()
    module.post_init()
    return module


def gptq_words(packed):
    """The layer's codes packed as GPTQ packs them (rows in order in a word), sorted rows."""
    return pack_rows(unpack_words(packed.qweight, packed.bits), packed.bits)


def gemlite(packed):
    import gemlite
    from gemlite import DType, GemLiteLinear

    codes = unpack_words(packed.qweight, packed.bits)  # [K, N], rows sorted
    layer = GemLiteLinear(
        packed.bits,
        group_size=packed.group_size,
        in_features=packed.in_features,
        out_features=packed.out_features,
        input_dtype=DType.FP16,
        output_dtype=DType.FP16,
    )
    layer.pack(
        codes.t().contiguous(),
        packed.scales.t().contiguous(),
        packed.zeros.t().contiguous(),
        bias=None,
    )
    return layer, gemlite


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--impls", nargs="+", default=["marlin", "marlin_sorted", "gemlite"])
    parser.add_argument("--gemlite-config", default="h100")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {}
    for name, (k, n) in SHAPES.items():
        perm = torch.randperm(k, device="cuda", generator=gen)
        part = {
            key: v.cuda()
            for key, v in _gptq_tensors(k, n, args.bits, args.group, perm, gen).items()
        }
        packed = pack_gptq([part], args.bits, args.group)
        weight = packed.dequantize().float()
        nbytes = (
            part["qweight"].numel() * 4 + part["scales"].numel() * 2 + part["qzeros"].numel() * 4
        )
        impls, gemv_outs = {}, {}
        for impl in args.impls:
            try:
                if impl == "marlin":
                    m = marlin(part, args.bits, args.group)
                    impls["marlin"] = lambda x, m=m: m(x)
                elif impl == "marlin_sorted":
                    ms = marlin_plain(
                        gptq_words(packed),
                        part["qzeros"],
                        part["scales"],
                        args.bits,
                        args.group,
                        k,
                        n,
                    )
                    p = packed.perm.long()
                    impls["marlin_sorted"] = lambda x, m=ms: m(x)
                    impls["marlin_sorted+gather"] = lambda x, m=ms, p=p: m(x[:, p])
                    ident = torch.arange(k, device="cuda")
                    part_i = {
                        key: v.cuda()
                        for key, v in _gptq_tensors(k, n, args.bits, args.group, ident, gen).items()
                    }
                    mi = marlin_plain(
                        part_i["qweight"],
                        part_i["qzeros"],
                        part_i["scales"],
                        args.bits,
                        args.group,
                        k,
                        n,
                    )
                    wi = pack_gptq([part_i], args.bits, args.group).dequantize().float()
                    xi = torch.randn(2, k, device="cuda", dtype=torch.float16)
                    ri = xi.float() @ wi
                    results[f"{name}/marlin_plain_identity_rel_err"] = float(
                        (mi(xi).float() - ri).norm() / ri.norm()
                    )
                    print(
                        name,
                        "plain identity rel_err",
                        results[f"{name}/marlin_plain_identity_rel_err"],
                        flush=True,
                    )
                elif impl == "cublas":  # prefill alternatives: tensor cores through cuBLAS
                    from langchain_synthia._kernels import gptq

                    dense = gptq._dequantized(packed).clone()  # rows in the input's sorted order
                    impls["dequant+cublas"] = lambda x, p=packed: x @ gptq._dequantized(p)
                    impls["cublas_fp16"] = lambda x, w=dense: x @ w  # the fp16 model's bound
                elif impl == "gemv4":  # ours, one row: every configuration in GEMV4
                    import dataclasses

                    from gemv4 import gemv4

                    natural = dataclasses.replace(packed, qweight=gptq_words(packed))
                    for block_n, block_k, split, half2 in GEMV4:
                        if n % block_n or k % (block_k * split):
                            continue
                        out = torch.zeros(1, n, device="cuda")
                        config = dict(block_n=block_n, block_k=block_k, split=split, half2=half2)
                        label = f"gemv4/{'h2' if half2 else 'f32'}/n{block_n}/k{block_k}/s{split}"
                        impls[label] = lambda x, p=natural, o=out, c=config: gemv4(x, p, o, **c)
                        gemv_outs[label] = out  # zeroed before the checked call only
                elif impl == "gemlite":
                    layer, gl = gemlite(packed)
                    if args.gemlite_config:
                        path = os.path.join(
                            os.path.dirname(gl.__file__), "configs", args.gemlite_config + ".json"
                        )
                        gl.core.GemLiteLinear.load_config(path)
                    p = packed.perm.long() if packed.perm is not None else None
                    impls["gemlite+gather"] = (
                        (lambda x, l=layer, p=p: l(x[:, p]))
                        if p is not None
                        else (lambda x, l=layer: l(x))
                    )
                    impls["gemlite"] = lambda x, l=layer: l(x)
            except Exception as error:
                results[f"{name}/{impl}/error"] = repr(error)[-600:]
                print(name, impl, "ERROR", repr(error)[:300], flush=True)
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ weight
            xs = x[:, packed.perm.long()] if packed.perm is not None else x
            for label, fn in impls.items():
                if label.startswith("gemv4") and rows != 1:
                    continue
                presorted = label.split("/")[0] in PRESORTED
                if label in gemv_outs:
                    gemv_outs[label].zero_()
                try:
                    got = (fn(xs) if presorted else fn(x)).float()
                    err = float((got - ref).norm() / ref.norm())
                    us = graph_time(fn, xs if presorted else x)
                    row = {
                        "us": round(us, 2),
                        "GBps": round(nbytes / us / 1e3, 1),
                        "TFLOPS": round(2 * rows * k * n / us / 1e6, 1),
                        "rel_err": round(err, 5),
                    }
                except Exception as error:
                    row = {"error": repr(error)[-600:]}
                results[f"{name}/m{rows}/{label}"] = row
                if not label.startswith("gemv4"):
                    print(f"{name:8s} m={rows:3d} {label:16s} {row}", flush=True)
            gemv = {lab: r for lab, r in results.items()
                    if lab.startswith(f"{name}/m{rows}/gemv4") and "us" in r}  # fmt: skip
            for kind in ("h2", "f32"):
                best = min((r["us"], lab) for lab, r in gemv.items() if f"/{kind}/" in lab) if any(
                    f"/{kind}/" in lab for lab in gemv) else None  # fmt: skip
                if best:
                    print(f"{name:8s} m={rows:3d} best {best[1]} {gemv[best[1]]}", flush=True)
            failed = [lab for lab, r in results.items() if "gemv4" in lab and "error" in r]
            if failed:
                print(name, "gemv4 errors:", len(failed), results[failed[0]], flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"kernel_probe_{args.bits}b_g{args.group}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
