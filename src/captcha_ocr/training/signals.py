"""SIGINT and SIGTERM handling: turn both into an exception, but never mid-checkpoint.

In one process the handler raises :class:`Interrupted` at once (except inside
:func:`deferred_signals`). Under torchrun it only records the signal: a rank that
raised on its own while the others wait in a collective would leave them hanging,
so the training loop checks :func:`pending_signal` on every rank at the same points
and all of them stop together.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives.

    It derives from BaseException, like KeyboardInterrupt, so that ordinary
    ``except Exception`` blocks do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


_defer_depth = 0
_pending: int | None = None
_raise_at_once = True


def _handle(signum: int, frame: object) -> None:
    global _pending
    if _defer_depth or not _raise_at_once:
        _pending = signum
        return
    raise Interrupted(signum)


def install_signal_handlers(raise_at_once: bool = True) -> dict[int, object]:
    """Route SIGINT and SIGTERM to :class:`Interrupted`; returns the previous handlers.

    With ``raise_at_once=False`` a signal is only recorded, for the caller to
    act on through :func:`pending_signal` at a point of its choosing.
    """
    global _pending, _raise_at_once
    if threading.current_thread() is not threading.main_thread():
        return {}
    _pending = None
    _raise_at_once = raise_at_once
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, _handle)
    return previous


def restore_signal_handlers(previous: dict[int, object]) -> None:
    global _pending, _raise_at_once
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _pending = None
    _raise_at_once = True


def pending_signal() -> int | None:
    """Return the signal recorded but not yet raised, or None."""
    return _pending


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise :class:`Interrupted`.

    When handlers only record signals, the signal stays recorded for
    :func:`pending_signal` instead of being raised here.
    """
    global _defer_depth, _pending
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _pending is not None and _raise_at_once:
            signum, _pending = _pending, None
            raise Interrupted(signum)
