"""Ctrl-C and SIGTERM at safe points.

Python raises `KeyboardInterrupt` wherever the main thread happens to be, a garbage collector's
weakref callback included, where it is printed as "Exception ignored" and lost; an unhandled
SIGTERM (what `timeout`, `docker stop`, systemd, Kubernetes and Slurm send) kills the process
outright, its running trial left RUNNING and its worker processes orphaned. While `deferred()` is
in force, a first SIGINT or SIGTERM only sets a flag, and `check()` raises at the next safe point:
between epochs (the trial is then recorded as `interrupted` or `terminated`), before a trial is
claimed, or between polls of `selector run --workers`. SIGINT raises `KeyboardInterrupt` (exit code
130), SIGTERM `Terminated` (exit code 143). A second signal raises at once, and so does a SIGTERM
whose safe point has not come within `TERM_GRACE_S` (an epoch longer than that): a container's
stop timeout (Docker's default is 10 s) then still finds the trial recorded.

A worker process of `selector run --workers` is asked to stop by its parent with SIGUSR1 (as
Ctrl-C) or SIGUSR2 (as SIGTERM): a stop at the next safe point, and never more, whether or not the
worker had the terminal's or the service manager's signal already.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# Seconds from a first SIGTERM to raising at once when no safe point came (an epoch is longer).
TERM_GRACE_S = 5.0
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class Terminated(KeyboardInterrupt):
    """SIGTERM: a stop like Ctrl-C's, recorded as `terminated`, exit code 143. A subclass of
    `KeyboardInterrupt`, so that every clean-up written for Ctrl-C runs for it too."""


_requested = threading.Event()
_cause: list[type[KeyboardInterrupt]] = [KeyboardInterrupt]  # what `check()` raises
_depth = [0]  # nested `deferred()` blocks: only the outermost installs and restores


def _ask(cause: type[KeyboardInterrupt]) -> None:
    """Ask for a stop at the next safe point; the first request sets what is raised."""
    if not _requested.is_set():
        _cause[0] = cause
        _requested.set()


def _raise() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)  # the grace alarm, if armed, is spent
    raise _cause[0]


def _handler(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM: the first one asks for a stop, a second one stops at once."""
    if _requested.is_set():
        _raise()
    _ask(Terminated if signum == signal.SIGTERM else KeyboardInterrupt)
    if signum == signal.SIGTERM:
        signal.setitimer(signal.ITIMER_REAL, TERM_GRACE_S)


def _request(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1 and SIGUSR2, from a parent process: a stop at the next safe point, never more."""
    _ask(Terminated if signum == signal.SIGUSR2 else KeyboardInterrupt)


def _alarm(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM grace ran out before a safe point came."""
    if _requested.is_set():
        _raise()


def defer() -> None:
    """Install the deferring handlers for the rest of this process (a worker process)."""
    _requested.clear()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGUSR1, _request)
    signal.signal(signal.SIGUSR2, _request)
    signal.signal(signal.SIGALRM, _alarm)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The deferring handlers for a block of the main thread; the previous handlers afterwards.
    Re-entrant: a nested block keeps the outer one's handlers and any stop already asked for.
    Elsewhere than the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0]:
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    defer()
    _depth[0] = 1
    try:
        yield
    finally:
        _depth[0] = 0
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)
        _requested.clear()


@contextlib.contextmanager
def escalation() -> Iterator[threading.Event]:
    """While a process stops its workers: a further SIGINT or SIGTERM sets the event it yields
    (stop them at once) instead of raising, so that the stop itself is never cut short and no
    worker is orphaned. The SIGTERM grace alarm is disarmed: the caller keeps its own time."""
    again = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield again
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: again.set())
    try:
        yield again
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """A safe point: raise `KeyboardInterrupt` (Ctrl-C) or `Terminated` (SIGTERM) if one came."""
    if _requested.is_set():
        _raise()


def exit_code(stop: KeyboardInterrupt) -> int:
    """The exit code of a process stopped by `stop`: 143 (128 + SIGTERM) or 130 (128 + SIGINT)."""
    return EXIT_CODES[signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT]
