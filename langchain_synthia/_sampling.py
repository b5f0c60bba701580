"""Choosing the next token for every row of a batch, each row with its own settings.

The order and the arithmetic follow transformers' logits processors (repetition penalty, then
temperature, top-k, top-p), so that greedy decoding agrees token for token with ``generate()``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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

        self._params = list(params)
        rows = len(self._params)
        self._temperature = torch.tensor([p.temperature for p in params], device=device)
        self._top_p = torch.tensor([p.top_p for p in params], device=device)
        self._top_k = torch.tensor([p.top_k for p in params], device=device)
        self._penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        self._use_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self._greedy = all(p.temperature == 0 for p in params)
        self._seen = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            self._seen[row, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
        self._generators = []
        for p in params:
            generator = torch.Generator(device=device)
            if p.seed is None:
                generator.seed()
            else:
                generator.manual_seed(p.seed)
            self._generators.append(generator)

    def sample(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Choose the next token of every row from its last-position `logits` ``[rows, vocab]``."""
        import torch

        scores = self.penalise(logits.float())
        chosen = scores.argmax(dim=-1)
        if not self._greedy:
            probs = self.warp(scores).softmax(dim=-1)
            sampled = torch.cat(
                [
                    torch.multinomial(probs[row], 1, generator=self._generators[row])
                    for row in range(len(self._params))
                ]
            )
            chosen = torch.where(self._temperature == 0, chosen, sampled)
        self._seen[torch.arange(len(chosen), device=chosen.device), chosen] = True
        return chosen

    def penalise(self, scores: "torch.Tensor") -> "torch.Tensor":
        """Apply each row's repetition penalty to the tokens it has seen."""
        if not self._use_penalty:
            return scores
        import torch

        penalty = self._penalty[:, None]
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(self._seen, penalised, scores)

    def warp(self, scores: "torch.Tensor") -> "torch.Tensor":
        """Temperature, then top-k, then top-p: tokens outside get ``-inf``."""
        import torch

        temperature = torch.where(self._temperature == 0, 1.0, self._temperature)
        scores = scores / temperature[:, None]
        vocab = scores.shape[-1]
        ordered, order = scores.sort(dim=-1, descending=False)
        # top-k: keep the k highest scores (ties with the k-th kept, as transformers does)
        k = torch.where(self._top_k > 0, self._top_k.clamp(max=vocab), vocab)
        kth = ordered.gather(-1, (vocab - k)[:, None])
        ordered = ordered.masked_fill(ordered < kth, -float("inf"))
        # top-p on the ascending order, transformers' formulation (always keeps the best token)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self._top_p)[:, None]
        remove[:, -1] = False
        ordered = ordered.masked_fill(remove, -float("inf"))
        return torch.empty_like(scores).scatter_(-1, order, ordered)
