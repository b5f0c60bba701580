"""Choosing the next token for every row of a batch, each row with its own settings.

The order and the arithmetic follow transformers' logits processors (repetition penalty, then
temperature, top-k, top-p), so that greedy decoding agrees token for token with ``generate()``.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SEED_RANGE = range(2**64)
"""Seeds a row's random generator takes (torch's generators are seeded with 64 bits)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one row chooses its tokens. ``temperature == 0`` means greedy (argmax)."""

    temperature: float
    top_p: float
    top_k: int
    """0 disables top-k."""
    repetition_penalty: float
    """1.0 disables it; applies to every token of the prompt and of the answer so far."""
    seed: int | None

    def __post_init__(self) -> None:
        """Refuse settings the sampler cannot run, so that they fail their own request only.

        Raises:
            ValueError: If a setting is not a number of its kind or is out of its range.
        """
        checks = {
            "temperature": _real(self.temperature) and self.temperature >= 0,
            "top_p": _real(self.top_p) and 0 < self.top_p <= 1,
            "top_k": _integer(self.top_k) and self.top_k >= 0,
            "repetition_penalty": _real(self.repetition_penalty) and self.repetition_penalty > 0,
            "seed": self.seed is None or (_integer(self.seed) and self.seed in SEED_RANGE),
        }
        problems = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if problems:
            msg = (
                f"Sampling settings out of range: {', '.join(problems)}. temperature >= 0, "
                "0 < top_p <= 1, top_k >= 0 (an integer), repetition_penalty > 0, and seed "
                f"None or an integer from 0 to {SEED_RANGE[-1]}."
            )
            raise ValueError(msg)


def _real(value: object) -> bool:
    """Whether `value` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
"""Settings of a row that holds no request (argmax, nothing to remember)."""


class BatchSampler:
    """Samples one token per row; keeps each row's random generator and seen-token set."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: "torch.device",
    ) -> None:
        import torch

        rows = len(params)
        self._device = device
        self._params = list(params)
        self._temperature = torch.zeros(rows, device=device)
        self._top_p = torch.ones(rows, device=device)
        self._top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self._penalty = torch.ones(rows, device=device)
        self._seen = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)
        self._generators: list[torch.Generator] = [torch.Generator(device=device)] * rows
        for row, (p, ids) in enumerate(zip(params, prompts, strict=True)):
            self.assign(row, p, ids)

    def assign(self, row: int, params: SamplingParams, prompt: Sequence[int]) -> None:
        """Give `row` a new request: its settings, its seed, the tokens of its prompt."""
        import torch

        self._params[row] = params
        self._temperature[row] = params.temperature
        self._top_p[row] = params.top_p
        self._top_k[row] = min(params.top_k, self._seen.shape[1])  # past the vocabulary: all
        self._penalty[row] = params.repetition_penalty
        self._seen[row] = False
        if prompt and params.repetition_penalty != 1.0:  # the seen set serves the penalty only
            # scatter_: an advanced-index assignment would wait for the device
            ids = torch.tensor(list(prompt), dtype=torch.long).to(self._device, non_blocking=True)
            self._seen[row].scatter_(0, ids, True)
        generator = torch.Generator(device=self._device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        self._generators[row] = generator

    def sample(
        self,
        logits: "torch.Tensor",
        row: int | None = None,
        allowed: "torch.Tensor | None" = None,
    ) -> "torch.Tensor":
        """Choose the next token from last-position `logits`.

        `logits` ``[rows, vocab]`` belong to the first ``rows`` rows; with `row`, `logits` is
        ``[1, vocab]`` and belongs to that one row. `allowed` (bool, same shape): only those
        tokens may be chosen (a grammar's mask).
        """
        import torch

        rows = range(logits.shape[0]) if row is None else range(row, row + 1)
        scores = self.penalise(logits.float(), rows)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -float("inf"))
        chosen = scores.argmax(dim=-1)
        if any(self._params[r].temperature > 0 for r in rows):
            probs = self.warp(scores, rows).softmax(dim=-1)
            sampled = torch.cat(
                [
                    torch.multinomial(probs[i], 1, generator=self._generators[r])
                    if self._params[r].temperature > 0
                    else chosen[i : i + 1]
                    for i, r in enumerate(rows)
                ]
            )
            chosen = torch.where(self._temperature[rows.start : rows.stop] == 0, chosen, sampled)
        # scatter_, not ``seen[rows, chosen] = True``: advanced-index assignment waits for the
        # device on CUDA, which stalled every decode step until its tokens were ready
        if self._penalised(rows):
            self._seen[rows.start : rows.stop].scatter_(1, chosen[:, None], True)
        return chosen

    def _penalised(self, rows: range) -> bool:
        """Whether any of `rows` has a repetition penalty (the seen-token set serves only it)."""
        return any(self._params[r].repetition_penalty != 1.0 for r in rows)

    def penalise(self, scores: "torch.Tensor", rows: range | None = None) -> "torch.Tensor":
        """Apply each row's repetition penalty to the tokens it has seen."""
        rows = rows or range(scores.shape[0])
        if not self._penalised(rows):
            return scores
        import torch

        penalty = self._penalty[rows.start : rows.stop, None]
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(self._seen[rows.start : rows.stop], penalised, scores)

    def warp(self, scores: "torch.Tensor", rows: range | None = None) -> "torch.Tensor":
        """Temperature, then top-k, then top-p: tokens outside get ``-inf``."""
        import torch

        rows = rows or range(scores.shape[0])
        part = slice(rows.start, rows.stop)
        temperature = torch.where(self._temperature[part] == 0, 1.0, self._temperature[part])
        # a tiny temperature (or repetition penalty) can push a score past the float range:
        # +inf would make the softmax NaN, the largest float keeps it a near-greedy choice
        scores = (scores / temperature[:, None]).clamp(max=torch.finfo(scores.dtype).max)
        vocab = scores.shape[-1]
        ordered, order = scores.sort(dim=-1, descending=False)
        # top-k: keep the k highest scores (ties with the k-th kept, as transformers does)
        top_k = self._top_k[part]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = ordered.gather(-1, (vocab - k)[:, None])
        ordered = ordered.masked_fill(ordered < kth, -float("inf"))
        # top-p on the ascending order, transformers' formulation (always keeps the best token)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self._top_p[part])[:, None]
        remove[:, -1] = False
        ordered = ordered.masked_fill(remove, -float("inf"))
        return torch.empty_like(scores).scatter_(-1, order, ordered)
