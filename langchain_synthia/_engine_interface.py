"""`Engine`: the one interface between the LangChain faces and whatever generates the tokens.

Tokens in, token events out: an engine takes `GenerationRequest`s and answers each with a
stream of `TokenEvent`s; it knows nothing of LangChain. Three engines implement it:
`langchain_synthia._transformers_engine.TransformersEngine` (transformers' model, any device),
`langchain_synthia._fast_engine.FastEngine` (CUDA graphs, continuous batching), both built on
`langchain_synthia._local_engine.LocalEngine`, and `langchain_synthia._remote.RemoteEngine`
(an OpenAI-compatible server). ``ChatSynthia`` and ``SynthiaLLM`` use engines through this
interface only.
"""

from collections.abc import AsyncIterable, Iterable, Sequence
from typing import Protocol, runtime_checkable

from langchain_synthia._requests import GenerationRequest, TokenEvent
from langchain_synthia._token_stream import TokenStream


@runtime_checkable
class Engine(Protocol):
    """Generates answers to `GenerationRequest`s as streams of `TokenEvent`s.

    Every method may be called from any thread. Each stream ends with one event that carries
    the finish reason and the token counts, or raises the error that ended its request alone.
    """

    kind: str
    """Which engine this is: ``"transformers"``, ``"fast"`` or ``"remote"``."""

    name: str
    """The model's name, reported as ``model_name`` in every answer's metadata."""

    batches_locally: bool
    """Whether the requests of one ``.batch()`` call are gathered here into one batch
    (`langchain_synthia._batching.batch_group`); false where the engine's server batches
    concurrent requests itself."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the BOS token the model expects."""
        ...

    def submit(self, requests: Sequence[GenerationRequest]) -> list[TokenStream]:
        """Start generating for all `requests` together; return their streams at once.

        Reading a stream gives its request's events; stopping early cancels the request.
        """
        ...

    def open(self, request: GenerationRequest) -> Iterable[TokenEvent]:
        """Start generating for `request` alone; its events, read synchronously."""
        ...

    def aopen(self, request: GenerationRequest) -> AsyncIterable[TokenEvent]:
        """Start generating for `request` alone; its events, read with ``async for``."""
        ...

    def check(self) -> None:
        """Raise if the engine cannot answer (a remote server that does not respond)."""
        ...
