"""Progress reported from deep inside long work, without a callback threaded through every layer.

The training loop calls :func:`steps_done` at each recorded step; a display that wants to show it
installs a listener for the duration with :func:`listening`. Without one, reporting costs one lookup.
A context variable, not a global: each thread (a certifying thread, a test) sees only its own listener.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

_listener: ContextVar[Callable[[int, int], None] | None] = ContextVar("hsgd_steps_listener", default=None)


def steps_done(step: int, total: int) -> None:
    """``step`` of ``total`` SGD steps are done (called by train/twin.py at recorded steps)."""
    listener = _listener.get()
    if listener is not None:
        listener(step, total)


@contextlib.contextmanager
def listening(listener: Callable[[int, int], None]) -> Iterator[None]:
    """Send :func:`steps_done` to ``listener(step, total)`` inside the ``with`` block."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
