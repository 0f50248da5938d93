"""Ctrl-C and SIGTERM are answers, not tracebacks.

Inside `stoppable()`, the first SIGINT or SIGTERM only records that a stop was asked for; the
trainer reads it at safe points (after each warm-start step, each RL step, each evaluation),
writes a checkpoint when the step completed, and raises `Stopped`, which the command line turns
into one line saying where it stopped and how to resume, with exit code 128 + the signal (130 for
SIGINT, 143 for SIGTERM). A second signal abandons the current phase at once (`Stopped` raised from
the handler): the last checkpoint stays as it was. Commands without a safe point of their own
(evaluation of a model folder) use `stoppable(at_once=True)`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_asked: int | None = None


class Stopped(Exception):
    """The person running the command asked it to stop; `str()` says where and how to go on."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def stoppable(*, at_once: bool = False) -> Iterator[None]:
    """Handle SIGINT and SIGTERM while the block runs (main thread only; elsewhere a no-op)."""
    global _asked
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        global _asked
        if at_once or _asked is not None:
            raise Stopped(signum, f"stopped by {name(signum)}")
        _asked = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _asked = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _asked = None


def asked() -> int | None:
    """The signal that asked for a stop in this process, or None."""
    return _asked
