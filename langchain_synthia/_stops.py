"""Stop strings found in streamed text, without ever emitting a part of one.

Pure text; used by the engine (stop sequences) and by the output parser (``USER:``).
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
    """

    def __init__(self, stops: Iterable[str]) -> None:
        """Match `stops` (empty strings are ignored; duplicates are harmless)."""
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._pending = ""
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
        tail, self._pending = self._pending, ""
        return tail

    @staticmethod
    def _prefix_overlap(buffer: str, stop: str) -> int:
        """Length of the longest end of `buffer` that is a proper start of `stop`."""
        for size in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if buffer.endswith(stop[:size]):
                return size
        return 0
