"""Stop strings found in streamed text, without ever emitting a part of one.

Pure text; used by the engines (stop sequences) and by the output parser (``USER:``).
"""

from collections.abc import Iterable


class StopMatcher:
    """Cuts a stream of text at the first stop string to complete.

    Generation stops as soon as a stop string has been written, so the cut is at the stop that
    *ends* first (of several ending at the same character, the longer one); the result does not
    depend on how the text was split into pieces.

    `feed` returns only text that can no longer turn into a stop: a tail that could still be the
    start of one is held back, and released by a later `feed` once it turns out to be text, or by
    `flush` when the stream ends. Stops may span any number of fed pieces.

    With `exempt_opening` (the text that opens a grammar-constrained answer, such as
    ``"<tool_call>"``), an answer that begins with it (after any whitespace) is never cut: it
    passes through whole, since a cut would leave a partial call. Any other answer is cut as
    usual. Until the answer's start tells which it is, its text is held back.
    """

    def __init__(self, stops: Iterable[str], exempt_opening: str | None = None) -> None:
        """Match `stops` outside answers that begin with `exempt_opening`.

        Empty stops are ignored and duplicates are harmless; with no `exempt_opening`, every
        answer is matched.
        """
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._pending = ""
        self._opening = exempt_opening or ""
        self._exempt: bool | None = None if self._opening and self._stops else False
        """Whether the answer is exempt; ``None`` while its start does not tell yet."""
        self.matched: str | None = None
        """The stop string that ended the stream, once one has."""

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found."""
        return self.matched is not None

    def feed(self, text: str) -> str:
        """Add `text`; return what is now safe to emit (empty once stopped)."""
        if self.stopped:
            return ""
        if self._exempt is None:
            text = self._decide(text)
            if self._exempt is None:
                return ""
        if self._exempt:
            return text
        buffer = self._pending + text
        found: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            at = buffer.find(stop)
            if at != -1 and (found is None or (at + len(stop), at) < found[:2]):
                found = (at + len(stop), at, stop)
        if found is not None:
            self.matched = found[2]
            self._pending = ""
            return buffer[: found[1]]
        hold = max((self._prefix_overlap(buffer, stop) for stop in self._stops), default=0)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """End the stream: return the held-back tail, which is text after all."""
        if self._exempt is None:  # the answer ended before its start told: it is text
            self._exempt = False
            text, self._pending = self._pending, ""
            cut = self.feed(text)
            if self.stopped:
                return cut
            return cut + self.flush()
        tail, self._pending = self._pending, ""
        return tail

    def _decide(self, text: str) -> str:
        """Hold `text` until the answer's start tells whether it is exempt; then return it all."""
        buffer = self._pending + text
        start = buffer.lstrip()
        if start.startswith(self._opening):
            self._exempt = True
        elif not self._opening.startswith(start):
            self._exempt = False
        else:
            self._pending = buffer
            return ""
        self._pending = ""
        return buffer

    @staticmethod
    def _prefix_overlap(buffer: str, stop: str) -> int:
        """Length of the longest end of `buffer` that is a proper start of `stop`."""
        for size in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if buffer.endswith(stop[:size]):
                return size
        return 0
