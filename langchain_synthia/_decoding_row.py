"""`DecodingRow`: one request's decoding state inside a batch, and what ends it.

A row is detokenized incrementally and cut at the first stop string to complete, without
ever emitting part of one; under a grammar, each token is sampled among those it allows
(`grammar_mask`). An error in one row's grammar or text ends that row's request alone
(`fail_row`, `advance_or_fail`). Both local engines decode `DecodingRow`s.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_synthia._detokenizer import IncrementalDetokenizer
from langchain_synthia._grammar import Constraint, allowed_tokens, bitmask_words
from langchain_synthia._requests import FinishReason, TokenEvent
from langchain_synthia._stops import StopMatcher
from langchain_synthia._token_stream import TokenStream

if TYPE_CHECKING:
    import torch


class DecodingRow:
    """The decoding state of one request inside a batch."""

    def __init__(
        self, stream: TokenStream, prompt_ids: list[int], budget: int, tokenizer: Any
    ) -> None:
        """Decode `stream`'s request from `prompt_ids`, at most `budget` new tokens."""
        self.stream = stream
        self.prompt_ids = prompt_ids
        self.budget = budget
        self.generated = 0
        self.done = False
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stream.request.stops, stream.request.constrained_opening)
        grammar = stream.request.grammar
        self.constraint = None if grammar is None else Constraint(grammar, tokenizer)

    def advance(self, token_id: int, eos_id: int | None) -> None:
        """Account for one new token and send its event."""
        self.generated += 1
        if self.constraint is not None and token_id != eos_id:
            self.constraint.advance(token_id)
        text = self.stops.feed(self.detokenizer.push(token_id))
        finish: FinishReason | None = None
        ended = self.stops.stopped or token_id == eos_id
        if ended or (self.constraint is not None and self.constraint.complete):
            finish = "stop"
        elif self.generated >= self.budget:
            finish = "length"
        if finish is not None and not self.stops.stopped:  # no token follows (EOS, budget,
            # grammar): the text held back as a possible start of a stop is text after all
            text += self.stops.feed(self.detokenizer.flush()) + self.stops.flush()
        if finish is None:
            self.stream.put(TokenEvent(text, token_id))
            return
        self.done = True
        self.stream.put(
            TokenEvent(text, token_id, finish, self.stream.input_tokens, self.generated)
        )


def grammar_mask(
    rows: Sequence["DecodingRow | None"], vocab_size: int, device: Any
) -> "torch.Tensor | None":
    """Tokens each row may take next under its grammar (``None`` when no row has one).

    A row whose grammar fails ends with that error (`fail_row`); the others go on.
    """
    constrained = [
        (index, row)
        for index, row in enumerate(rows)
        if row is not None and row.constraint is not None and not row.done
    ]
    if not constrained:
        return None
    import torch

    bitmask = torch.full((len(rows), bitmask_words(vocab_size)), -1, dtype=torch.int32)
    for index, row in constrained:
        try:
            row.constraint.fill(bitmask, index)  # type: ignore[union-attr]
        except Exception as error:
            fail_row(row, error)  # type: ignore[arg-type]
    return allowed_tokens(bitmask.to(device), vocab_size)


def fail_row(row: DecodingRow, error: BaseException) -> None:
    """End `row`'s request with `error`, and only its request (a finished row is left alone)."""
    if not row.done:
        row.done = True
        row.stream.put(error)


def advance_or_fail(row: DecodingRow, token_id: int, eos_id: int | None) -> None:
    """`DecodingRow.advance`; an error there (its grammar, its text) ends its request alone."""
    try:
        row.advance(token_id, eos_id)
    except Exception as error:
        fail_row(row, error)
