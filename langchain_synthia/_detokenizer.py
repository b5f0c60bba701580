"""`IncrementalDetokenizer`: token ids to text, one token at a time."""

from typing import Any


class IncrementalDetokenizer:
    """Turns token ids into text one token at a time (SentencePiece spaces and UTF-8 intact)."""

    def __init__(self, tokenizer: Any) -> None:
        """Decode with `tokenizer` (a transformers tokenizer)."""
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = (  # the Rust tokenizer itself: the same text, a third of the time
            backend if not getattr(tokenizer, "clean_up_tokenization_spaces", True) else None
        )
        self._ids: list[int] = []
        self._prefix = 0  # decoding starts here, so the first token's space is handled alike
        self._read = 0  # text up to here has been returned

    def push(self, token_id: int) -> str:
        """The text `token_id` completes; ``""`` while it ends inside a UTF-8 character."""
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the answer)."""
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)
