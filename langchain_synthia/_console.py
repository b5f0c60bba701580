"""Keeping the GPTQ stack's banners and progress bars off the user's terminal."""

import contextlib
import os
import sys
from collections.abc import Iterator


def verbose() -> bool:
    """Whether ``SYNTHIA_VERBOSE`` asks to see everything the loading stack prints."""
    return os.environ.get("SYNTHIA_VERBOSE", "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def quiet_output(*, enabled: bool = True) -> Iterator[None]:
    """Silence whatever writes to the stdout/stderr file descriptors inside the block.

    gptqmodel prints a banner and live progress bars straight to the terminal. Exceptions still
    propagate (and are printed after the descriptors are restored). ``SYNTHIA_VERBOSE=1`` or
    ``enabled=False`` lets everything through.
    """
    if not enabled or verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull:
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
