"""What a caller asks an engine for, and what comes back: `GenerationRequest` and `TokenEvent`.

Engines know nothing of LangChain: the faces turn a call into `GenerationRequest`s, an engine
(`langchain_synthia._engine_interface.Engine`) answers each with a stream of `TokenEvent`s.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from langchain_synthia._sampling import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete, with everything that decides how."""

    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    timeout: float | None = None
    """Seconds the whole generation may take; ``None`` waits as long as it runs."""
    context_window: int = 4096
    """Prompt plus answer may not exceed this many tokens (the prompt alone must fit)."""
    grammar: str | None = None
    """An llguidance grammar the answer must follow (`langchain_synthia._grammar`): each token
    is sampled among those the grammar allows, and the answer ends when it is complete."""
    constrained_opening: str | None = None
    """With a grammar that allows free text or a constrained part (``tool_choice="auto"``),
    the text that opens the constrained part (``"<tool_call>"``): an answer that begins with
    it, after any whitespace, is never cut by `stops`, which cut only the other answers."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it makes final.

    ``text`` may be empty: text that could still become a stop string, or an incomplete UTF-8
    character, is held back and arrives with a later token. The last event of a stream carries
    the ``finish_reason`` and the token counts.
    """

    text: str
    token_id: int
    finish_reason: FinishReason | None = None
    input_tokens: int = 0
    output_tokens: int = 0


def whole_answer(events: Sequence[TokenEvent]) -> TokenEvent:
    """A finished stream's events as one: all the text, the last event's finish and usage.

    Calls that do not stream (``invoke`` with no token callbacks, ``batch``) read their answer
    this way: nothing is built per token on the caller's side, which is what keeps a batch of
    32 from being bound by Python work in 32 threads.
    """
    return replace(events[-1], text="".join(event.text for event in events))


def deadline_of(request: GenerationRequest) -> float | None:
    """The `time.monotonic` time by which `request` must end (``None``: no limit, or inf)."""
    timeout = request.timeout
    if timeout is None or math.isinf(timeout):
        return None
    return time.monotonic() + timeout
