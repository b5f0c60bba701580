"""The terminal: the GPTQ stack's banners kept off it, and our own progress shown on it."""

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator


def verbose() -> bool:
    """Whether ``SYNTHIA_VERBOSE`` asks to see everything the loading stack prints."""
    return os.environ.get("SYNTHIA_VERBOSE", "").lower() in ("1", "true", "yes")


class _Discard(io.TextIOBase):
    """A text stream that drops what is written (it stays usable if a library keeps it)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


_DISCARD = _Discard()


@contextlib.contextmanager
def quiet_output(*, enabled: bool = True) -> Iterator[None]:
    """Silence what the loading stack writes inside the block, at both levels.

    gptqmodel prints a banner and live progress bars, and torchao and transformers print
    warnings. In a terminal they go to the stdout/stderr file descriptors; in a notebook
    kernel, to Python's ``sys.stdout``/``sys.stderr`` objects. Both are silenced. Exceptions
    still propagate (and are shown after the block). ``SYNTHIA_VERBOSE=1`` or
    ``enabled=False`` lets everything through.
    """
    if not enabled or verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with (
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(_DISCARD),
            contextlib.redirect_stderr(_DISCARD),
        ):
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """Show `message` with a running count of seconds on the terminal until the block ends.

    It writes to its own copy of the stderr descriptor, so the count stays visible while
    `quiet_output` silences the loading stack. Off a terminal it writes one line at the start
    and one at the end.
    """
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (OSError, ValueError):  # no descriptor (a captured stderr): write to it as it is
        stream = sys.stderr
    live = stream.isatty()
    start = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.25):
            stream.write(f"\r\x1b[K{message}... {time.monotonic() - start:.0f} s")

    stream.write(f"{message}...{'' if live else chr(10)}")
    ticker = threading.Thread(target=tick, daemon=True) if live else None
    if ticker:
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker:
            ticker.join()
            stream.write("\r\x1b[K")
        elapsed = time.monotonic() - start
        outcome = "done" if sys.exc_info()[0] is None else "stopped"
        stream.write(f"{message}: {outcome} in {elapsed:.1f} s\n")
        if stream is not sys.stderr:
            stream.close()
