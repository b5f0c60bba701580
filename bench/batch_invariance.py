"""Greedy answers alone and in full batches, on a GPU: how often do they differ, and where.

On the CPU the fast engine gives every greedy call the answer it gets alone, whatever runs
beside it (tests/integration_tests/test_concurrency.py). On a GPU the decode step's kernels
depend on the batch size (Marlin's and the Triton kernels' tiles, our batch-1 GEMV, split-K
sums added atomically in no fixed order), so a row's logits can differ by rounding, and where
two tokens are nearly tied the greedy choice can flip. This counts it: the same prompts alone
(twice, to see run-to-run repeats at batch 1) and as one `.batch()` filling every cache row
(twice), and the first token where each differing answer parts from its answer alone.

    python bench/batch_invariance.py --model PATH [--kernel gptq_marlin] [--prompts 64]
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
import torch

from langchain_synthia import ChatSynthia


def parting(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where `a` and `b` differ (None when equal)."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a GPTQ checkpoint folder")
    parser.add_argument("--kernel", default=None, help="gptq_marlin (default) or triton")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8, help="cache rows (max_batch_size)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    chat = ChatSynthia(
        model=args.model, device=args.device, engine="fast", kernel=args.kernel, temperature=0,
        max_tokens=args.new_tokens, max_batch_size=args.rows, stop_at_user_turn=False,
        system_message=None,
    )  # fmt: skip
    engine = chat._engine_for(chat.model, chat.revision)
    tokenizer = engine.tokenizer
    prompts = [f"Question {i}: say something about the number {i}." for i in range(args.prompts)]

    def ids(messages: list) -> list[list[int]]:
        return [tokenizer.encode(m.content, add_special_tokens=False) for m in messages]

    alone = ids([chat.invoke(p) for p in prompts])  # one after the other: each alone
    alone_again = ids([chat.invoke(p) for p in prompts])
    batched = ids(chat.batch(prompts))
    batched_again = ids(chat.batch(prompts))

    def differ(runs: list[list[int]]) -> list[dict]:
        return [
            {"prompt": prompts[i], "token": at}
            for i, (a, b) in enumerate(zip(alone, runs, strict=True))
            if (at := parting(a, b)) is not None
        ]

    rows = {
        "device": args.device,
        "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": args.model,
        "kernel": args.kernel or "default",
        "gemv_race_us": getattr(engine.model, "gemv_race", {}),
        "prompts": len(prompts),
        "rows": args.rows,
        "new_tokens": args.new_tokens,
        "alone_again_differ": differ(alone_again),
        "batch_differ": differ(batched),
        "batch_again_differ": differ(batched_again),
        "batch_runs_differ_from_each_other": sum(
            a != b for a, b in zip(batched, batched_again, strict=True)
        ),
    }
    print(json.dumps(rows, indent=1))
    out = os.environ.get("OUT")
    if out:
        name = f"batch-invariance-{rows['kernel']}.json"
        Path(out, name).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
