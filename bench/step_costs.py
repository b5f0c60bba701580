"""What each kind of kernel costs a captured batch-1 decode step, and the step under variants.

Loads the fast engine (``kernel="triton"``: no Marlin build; at batch 1 it runs the same
kernels as with Marlin where our GEMV wins the race) on the random 7B checkpoint that
`bench/bench.py` builds, then times the captured step (``FastMistral.decode`` for one token at
768 keys, the bench's 512-token prompt plus 256 new) as it is and with one kind of kernel left
out (its launches skipped, so its outputs are stale: timing only). A kind's cost is what the
step loses without it, waits included, which a profile of the kernels alone cannot show. Also
the step with each pair of GEMV configurations forced (one for the 4,096-input shapes, one for
down's 14,336), with the attention's keys cut into other numbers of splits, and with other
attention tiles (keys a block, warps, reading ahead of the wait or not; ``--batch N`` times
those at N rows too).

    python bench/step_costs.py --tokenizer-from <tok>  (on a GPU; writes $OUT/step_costs.json)
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from bench import build_checkpoint
from langchain_synthia import _kernels as K
from langchain_synthia._fast_model import FastMistral
from langchain_synthia._linear import graph_us

KEYS = 768


class _Skipped:
    """Stands for a Triton kernel whose launches are skipped."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    @property
    def fn(self):
        return self


def step_us(fast: FastMistral, batch: int = 1) -> float:
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    positions = torch.full((batch,), KEYS - 1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        return graph_us(lambda: fast.decode(batch, tokens, positions), calls=1, replays=50)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/synthia-bench"))
    parser.add_argument("--parts", default="kinds,configs,splits,tiles")
    parser.add_argument("--batch", type=int, default=1, help="also time tiles at this batch")
    args = parser.parse_args()
    parts = args.parts.split(",")
    folder = build_checkpoint(args.work / "main", "main", args.tokenizer_from)
    fast = FastMistral(folder, torch.device("cuda"), max_batch=args.batch, max_len=4096,
                       kernel="triton")  # fmt: skip
    results: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                     "race_us": fast.gemv_race}  # fmt: skip
    base = step_us(fast)
    results["step_us"] = round(base, 1)
    print(f"step {base:.1f} µs; race {fast.gemv_race}", flush=True)
    kinds = {
        "norm": ["_add_rms_norm_kernel"], "attention": ["_decode_attention_kernel"],
        "combine": ["_combine_kernel"], "attention+combine": ["_decode_attention_kernel",
        "_combine_kernel"], "silu_mul": ["_silu_mul_kernel"], "gemv": ["_gemv_kernel"],
        "all_but_gemv": ["_add_rms_norm_kernel", "_decode_attention_kernel", "_combine_kernel",
        "_silu_mul_kernel"],
    }  # fmt: skip
    for kind, names in kinds.items() if "kinds" in parts else ():
        saved = {name: getattr(K, name) for name in names}
        for name in names:
            setattr(K, name, _Skipped())
        try:
            us = step_us(fast)
        finally:
            for name, kernel in saved.items():
                setattr(K, name, kernel)
        results[f"without/{kind}"] = round(us, 1)
        print(f"without {kind:18s} {us:8.1f} µs (saves {base - us:6.1f})", flush=True)
    tuner = K._gemv_kernel
    configs = tuner.configs
    four, fourteen = configs[:2], configs[2:4]
    for a in four if "configs" in parts else ():
        for b in fourteen:
            tuner.configs, tuner.cache = [a, b], {}
            us = step_us(fast)
            label = f"{a.kwargs}/{a.num_warps}/{a.maxnreg} + {b.kwargs}/{b.num_warps}/{b.maxnreg}"
            results[f"gemv_configs/{label}"] = round(us, 1)
            print(f"configs {label}: {us:.1f} µs", flush=True)
    tuner.configs, tuner.cache = configs, {}
    buf = fast._buffers[(1, False)]
    work = buf["attn_work"]
    for splits in (8, 16, 64) if "splits" in parts else ():
        buf["attn_work"] = K.AttentionWorkspace(1, fast.heads, fast.kv_heads, fast.head_dim,
                                                fast.max_len, fast.device, splits=splits)  # fmt: skip
        us = step_us(fast)
        results[f"attention_splits/{splits}"] = round(us, 1)
        print(f"attention in {splits} splits (engine: {work.splits}): {us:.1f} µs", flush=True)
    buf["attn_work"] = work
    launch = getattr(K, "_attention_launch", None)
    batches = sorted({1, args.batch})
    tiles = ((64, 4, False), (64, 4, True), (64, 8, False), (64, 8, True), (128, 8, True))
    for block, warps, ahead in tiles if launch and "tiles" in parts else ():
        K._attention_launch = lambda batch, rope, block=block, warps=warps, ahead=ahead: {
            "BLOCK_S": block, "num_warps": warps, "AHEAD": ahead and rope
        }  # fmt: skip
        for batch in batches:
            us = step_us(fast, batch)
            results[f"attention_tile/b{batch}/{block}/{warps}/ahead{ahead}"] = round(us, 1)
            print(f"batch {batch}, attention blocks of {block} keys, {warps} warps, read ahead "
                  f"{ahead}: {us:.1f} µs", flush=True)  # fmt: skip
    if launch:
        K._attention_launch = launch
    if args.batch > 1:
        results[f"step_us_b{args.batch}"] = round(step_us(fast, args.batch), 1)
        print(f"batch {args.batch} step", results[f"step_us_b{args.batch}"], flush=True)
    results["step_us_again"] = round(step_us(fast), 1)
    print("step again", results["step_us_again"], flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "step_costs.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
