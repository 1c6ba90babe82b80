"""Ctrl-C at safe points: the first SIGINT is deferred to `check()`, a second one is not."""

from __future__ import annotations

import os
import signal

import pytest

from selector import interrupt


def test_first_sigint_waits_for_a_safe_point_second_is_immediate() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interrupt.deferred():
        interrupt.check()  # nothing pressed yet
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):  # the handler runs as soon as the kill returns
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before and not interrupt.requested()


def test_sigusr1_asks_for_a_stop_and_never_interrupts_at_once() -> None:
    with interrupt.deferred():
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGUSR1)
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
