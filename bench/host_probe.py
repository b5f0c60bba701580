"""Host probe: what the Python side of the fast engine costs, with no model at all (any CPU).

The fast engine's scheduler runs with a stand-in network whose prefill and decode return fixed
logits at once, so everything measured is host work: LangChain's call paths, the batch group,
the scheduler, sampling launches, detokenizing, stop matching and handing tokens to callers.
It prints tokens per second for a `.batch()` of 32 and for 16 concurrent `astream` calls, the
two GPU figures that host work limits (docs/benchmarks.md), and the CPU time per token over all
threads (steadier than the rate on a shared machine).

    python bench/host_probe.py --tokenizer-from PATH [--new-tokens 256] [--runs 3]
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import prompt_of, stream_all
from langchain_synthia import ChatSynthia
from langchain_synthia._fast_engine import FastEngine
from langchain_synthia._loading import _engines, _tokenizer


class StandIn:
    """Just enough of `FastMistral` for the scheduler: fixed logits, no arithmetic."""

    def __init__(self, vocab_size: int, token: int, max_batch: int, max_len: int) -> None:
        self.device = torch.device("cpu")
        self.max_batch, self.max_len, self.vocab_size = max_batch, max_len, vocab_size
        self.dense_prefill = False
        self.k_cache = self.v_cache = torch.zeros(1, max_batch, 1)
        self._logits = torch.full((max(max_batch, 128), vocab_size), -10.0)
        self._logits[:, token] = 10.0  # one ordinary word piece, again and again

    def prefill_many(self, prompts: list) -> torch.Tensor:
        return self._logits[: len(prompts)].clone()

    def decode(self, batch: int, tokens, positions, rows=None) -> torch.Tensor:
        return self._logits[:batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tokenizer = _tokenizer(args.tokenizer_from)
    token = tokenizer(" the", add_special_tokens=False).input_ids[-1]
    vocab = 512  # the first 512 ids only: the sampler's tensor math stays small, as on a GPU
    assert token < vocab, token
    chat = ChatSynthia(
        model=str(args.tokenizer_from), device="cpu", engine="fast", temperature=0,
        repetition_penalty=1.0, stop_at_user_turn=False, max_batch_size=32,
    )  # fmt: skip  # greedy, no penalty: sampling's tensor math is GPU work, not host work
    model = StandIn(vocab, token, 32, 4096)
    engine = FastEngine(model, tokenizer, name="stand-in", graphs=False)
    _engines[chat._settings(chat.model, chat.revision)] = engine
    prompts = [prompt_of(512 - 7 * i, tokenizer) for i in range(32)]
    chat.batch(prompts[:2], max_tokens=4)  # warm

    cpu: dict[str, list[float]] = {"batch": [], "streams": []}

    def batch() -> float:
        start, used = time.perf_counter(), time.process_time()
        answers = chat.batch(prompts, max_tokens=args.new_tokens)
        tokens = sum(a.usage_metadata["output_tokens"] for a in answers)
        cpu["batch"].append((time.process_time() - used) / tokens * 1e6)
        return tokens / (time.perf_counter() - start)

    async def streams(n: int) -> float:
        start, used = time.perf_counter(), time.process_time()
        tokens = await stream_all(chat, prompts[:n], args.new_tokens)
        cpu["streams"].append((time.process_time() - used) / tokens * 1e6)
        return tokens / (time.perf_counter() - start)

    batches = [batch() for _ in range(args.runs)]
    concurrent = [asyncio.run(streams(16)) for _ in range(args.runs)]
    for name, rates, key in (
        (f"batch of 32 x {args.new_tokens}", batches, "batch"),
        ("16 concurrent astream", concurrent, "streams"),
    ):
        print(f"{name}: {statistics.median(rates):,.0f} tok/s, "
              f"{statistics.median(cpu[key]):.1f} µs of CPU per token "
              f"(runs {', '.join(f'{r:,.0f}' for r in rates)})")  # fmt: skip
    engine.close()


if __name__ == "__main__":
    main()
