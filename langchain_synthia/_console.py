"""The terminal: the stack's banners kept off it, our progress and safe text shown on it.

Safe text: what the model, a server or a file says, cleaned of what a terminal would act on.
"""

import contextlib
import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator

# What a terminal acts on instead of showing: escape sequences, taken out whole (a string
# sequence with its payload up to its terminator), then the controls left alone
_SEQUENCE = re.compile(
    r"""
    (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])     # OSC, DCS, SOS, PM, APC
        [^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)    #   payload, then BEL or ST
    | (?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]   # CSI
    | \x1b[\x20-\x2f]*[\x30-\x7e]                   # any other escape sequence
    """,
    re.VERBOSE,
)
_C0 = r"\x00-\x08\x0b-\x1f"  # all but tab and newline
_DEL_C1_BIDI = r"\x7f-\x9f\u202a-\u202e\u2066-\u2069"  # bidi embeddings, overrides, isolates
_CONTROL = re.compile(f"[{_C0}{_DEL_C1_BIDI}]")
_CONTROL_NOT_IN_JSON = re.compile(f"[{_DEL_C1_BIDI}]")  # JSON escapes C0 itself


def printable(text: str) -> str:
    """`text` with what a terminal would act on instead of showing taken out.

    Escape sequences go whole (CSI, OSC, DCS, SOS, PM, APC, and two-character sequences,
    introduced by ESC or by their C1 character): no window title set, no clipboard written,
    no colour or cursor move. Then every other C0 and C1 control but newline and tab goes,
    a carriage return before a newline included (a lone one would let text overwrite the
    line), and DEL, and the bidi embeddings, overrides and isolates (U+202A-U+202E,
    U+2066-U+2069), which reorder what a line shows; the bidi marks (U+200E, U+200F, U+061C)
    stay. Anything else is kept as it is. Each piece of a stream can be cleaned on its own:
    a sequence split between two pieces loses its ESC, so a terminal shows it as text.
    """
    return _CONTROL.sub("", _SEQUENCE.sub("", text).replace("\r\n", "\n"))


def printable_line(text: str) -> str:
    """`printable`, with every run of line breaks (and the space around it) made one space."""
    return re.sub(r"\s*\n\s*", " ", printable(text)).strip()


def printable_json(value: object, **options: object) -> str:
    r"""``json.dumps(value, ensure_ascii=False, **options)``, safe to show on a terminal.

    JSON escapes the C0 controls itself; DEL, the C1 controls and the bidi embeddings,
    overrides and isolates are escaped too (``\u009b``), so the document reads back to
    the same value and a terminal never acts on it.
    """
    document = json.dumps(value, ensure_ascii=False, **options)
    return _CONTROL_NOT_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", document)


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
    _flush_standard_streams()
    saved = {}
    for fd in (1, 2):
        with contextlib.suppress(OSError):  # a closed descriptor has nothing to silence
            saved[fd] = os.dup(fd)
    try:
        with (
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(_DISCARD),
            contextlib.redirect_stderr(_DISCARD),
        ):
            for fd in saved:
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        _flush_standard_streams()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: started with the descriptor closed
            stream.flush()


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """Show `message` with a running count of seconds on the terminal until the block ends.

    It writes to its own copy of the stderr descriptor, so the count stays visible while
    `quiet_output` silences the loading stack. Off a terminal it writes one line at the start
    and one at the end, and with standard error closed nothing.
    """
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        owned = True
    except (AttributeError, OSError, ValueError):  # a captured stderr: write to it as it is
        stream, owned = sys.stderr or _DISCARD, False  # (None: started with it closed)
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
        if owned:
            stream.close()
