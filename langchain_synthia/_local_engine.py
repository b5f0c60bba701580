"""`LocalEngine`: what the two engines that decode on this machine share.

`langchain_synthia._transformers_engine.TransformersEngine` and
`langchain_synthia._fast_engine.FastEngine` tokenize and validate requests alike, and decode
each as a `DecodingRow` that streams into a `TokenStream`; they differ only in how rows are
decoded (`LocalEngine.start`).
"""

from collections.abc import Sequence
from typing import Any

from langchain_synthia._decoding_row import DecodingRow
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._token_stream import TokenStream


class LocalEngine:
    """What the local engines share: tokenizing, validating and streaming requests.

    An `langchain_synthia._engine_interface.Engine`. Subclasses decide how rows are decoded
    (`start`). Thread-safe: requests may be submitted from any thread.
    """

    kind = "local"
    """Which engine this is; each subclass names itself (``"transformers"``, ``"fast"``)."""
    batches_locally = True
    """Requests opened inside a ``.batch()`` call join one engine batch
    (`langchain_synthia._batching.BatchGroup`)."""

    def __init__(self, tokenizer: Any, *, name: str, device: Any, max_len: int) -> None:
        """Serve `tokenizer`'s model under `name` on `device`, prompts + answers <= `max_len`."""
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.max_len = max_len
        self.eos_id: int | None = tokenizer.eos_token_id
        """The token that ends an answer."""
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        """The token that pads prompts of a batch to one length."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the one BOS token the model expects.

        Raises:
            ValueError: If `text` is not text that UTF-8 can encode (a lone surrogate).
        """
        if not isinstance(text, str):
            msg = f"A prompt must be a str, not {type(text).__name__}."
            raise TypeError(msg)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            msg = (
                f"The prompt holds {text[error.start]!r} at character {error.start}, a lone "
                "surrogate, which is not text and cannot be tokenized: remove it, or decode "
                "the input's bytes with errors='replace' (not 'surrogateescape')."
            )
            raise ValueError(msg) from None
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def submit(self, requests: Sequence[GenerationRequest]) -> list[TokenStream]:
        """Start generating for `requests` as one padded batch; return their streams at once.

        Raises:
            ValueError: If a prompt does not fit the context window (nothing is truncated)
                or is not text.
        """
        rows = [self.row_for(request) for request in requests]
        self.start(rows)
        return [row.stream for row in rows]

    def open(self, request: GenerationRequest) -> TokenStream:
        """Start generating for `request` alone; return its stream at once."""
        return self.submit([request])[0]

    def aopen(self, request: GenerationRequest) -> TokenStream:
        """`open` for async callers (a `TokenStream` is read with ``async for`` as well)."""
        return self.submit([request])[0]

    def check(self) -> None:
        """Nothing to check: the model is loaded when the engine exists."""

    def close(self) -> None:
        """Stop decoding: requests still open end with `EngineStoppedError`."""
        raise NotImplementedError

    def start(self, rows: list[DecodingRow]) -> None:
        """Decode `rows` (built by `row_for`); each streams into its own `TokenStream`.

        Returns at once: the rows decode in the engine's own thread.
        """
        raise NotImplementedError

    def row_for(self, request: GenerationRequest) -> DecodingRow:
        """`request`'s prompt tokenized and checked against the context window, as a row.

        Raises:
            ValueError: If the prompt does not fit the context window (nothing is truncated)
                or is not text.
            TypeError: If the prompt is not a str.
        """
        ids = self.encode(request.prompt)
        window = min(request.context_window, self.max_len)
        room = window - len(ids)
        if room <= 0:
            msg = (
                f"The prompt is {len(ids)} tokens but Synthia's context window is "
                f"{window} tokens. Shorten the prompt or the conversation history "
                "(nothing is truncated for you)."
            )
            raise ValueError(msg)
        budget = min(request.max_new_tokens, room)
        return DecodingRow(TokenStream(request, len(ids)), ids, budget, self.tokenizer)
