"""The Triton interpreter switch the kernels share: is `TRITON_INTERPRET` on, and a context that sets it."""

from __future__ import annotations

import contextlib
import os


def interpreting() -> bool:
    """True when `TRITON_INTERPRET` is set in the environment now (CPU tensors then run the Triton kernels).

    Example:
        >>> with interpreter(False):
        ...     interpreting()
        False
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def interpreter(on: bool = True):
    """Set `TRITON_INTERPRET` to `on` inside the block, restoring the previous value after.

    Example:
        >>> with interpreter():
        ...     os.environ["TRITON_INTERPRET"]
        '1'
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
