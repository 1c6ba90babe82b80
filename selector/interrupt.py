"""Ctrl-C at safe points.

Python raises `KeyboardInterrupt` wherever the main thread happens to be, a garbage collector's
weakref callback included, where it is printed as "Exception ignored" and lost. While `deferred()`
is in force, a first SIGINT only sets a flag, and `check()` raises `KeyboardInterrupt` at the next
safe point: between epochs (the trial is then recorded as interrupted), before a trial is claimed,
or between polls of `selector run --workers`. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_requested = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
    _requested.set()


def _request(signum: int, frame: FrameType | None) -> None:
    _requested.set()


def defer() -> None:
    """Install the deferring handler for the rest of this process (a worker process). SIGUSR1
    asks for a stop at the next safe point too, and never more: what `selector run --workers`
    sends its workers, which may have had the terminal's SIGINT already."""
    _requested.clear()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGUSR1, _request)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The deferring handler for a block of the main thread; the previous handler afterwards.
    Elsewhere than the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    defer()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGUSR1, previous[1])
        _requested.clear()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """A safe point: raise `KeyboardInterrupt` if Ctrl-C was pressed."""
    if _requested.is_set():
        raise KeyboardInterrupt
