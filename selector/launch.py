"""Start N local worker processes on one study, watch them, and stop them together.

The parent creates or resumes the study (so every input is checked once), then spawns workers
that join it like `selector worker` would, each with its share of the cores. Progress is read from
the database, the one place all workers write to. An error in any worker is reported, never lost.

A Ctrl-C or SIGTERM reaching the parent is passed on to every worker (SIGUSR1 or SIGUSR2: stop at
the next safe point); the parent waits for them, and after a grace period (or at a second signal)
terminates them, then kills any that still remain: no worker outlives the parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import optuna

from selector import interrupt, record, study, worker
from selector.errors import SelectorError
from selector.spec import StudySpec
from selector.storage import Heartbeat

POLL_S = 0.5
STOP_GRACE_S = 30.0  # Ctrl-C: the workers' epochs may take a while; someone is watching
TERM_GRACE_S = interrupt.TERM_GRACE_S  # SIGTERM: within Docker's 10 s before its SIGKILL
KILL_GRACE_S = 3.0  # after SIGTERM to a worker (it records its trial at once), before SIGKILL


class WorkerError(SelectorError):
    """A worker process failed; carries its message and exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _child(
    url: str,
    name: str,
    limit: int,
    timeout: float | None,
    heartbeat: Heartbeat,
    threads: int,
    errors: Any,
    fuse: int | str | None = None,
) -> None:
    worker.use_threads(threads)
    interrupt.defer()  # a Ctrl-C or SIGTERM (its own or the parent's): the next safe point
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study.work(url, name, limit=limit, timeout=timeout, heartbeat=heartbeat, fuse=fuse)
    except SelectorError as e:
        errors.put((os.getpid(), str(e), e.exit_code))
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM, its running trial recorded
        raise SystemExit(interrupt.exit_code(e)) from None


def run(
    spec: StudySpec,
    url: str,
    *,
    workers: int,
    n_trials: int | None = None,
    timeout: float | None = None,
    heartbeat: Heartbeat = Heartbeat(),
    threads: int | None = None,
    progress: worker.Progress | None = None,
    fuse: int | str | None = None,
) -> record.RunSummary:
    """Create or resume the study and run `workers` processes on it until its budget is spent.
    A Ctrl-C or SIGTERM (deferred from the start, so that none comes while workers are started)
    stops every worker, then raises `KeyboardInterrupt` or `interrupt.Terminated`."""
    with interrupt.deferred():
        s, _, _ = study.create_or_resume(spec, url)
        limit = study.budget_limit(s, url, spec.n_trials, n_trials)
        start = record.count(s)
        workers = max(1, min(workers, limit - start))  # no more workers than trials left to run
        ctx = mp.get_context("spawn")
        errors = ctx.Queue()
        threads = threads or worker.torch_threads(workers)
        procs = [
            ctx.Process(
                target=_child,
                name=f"selector-worker-{i}",
                args=(url, spec.name, limit, timeout, heartbeat, threads, errors, fuse),
            )
            for i in range(workers)
        ]
        try:
            for p in procs:
                interrupt.check()  # a stop asked for already: start no more
                p.start()
            _watch(s, procs, progress)
        except KeyboardInterrupt as e:
            _stop(procs, terminated=isinstance(e, interrupt.Terminated))
            raise
    _raise_first_error(procs, errors)
    return record.summarize(s, limit, ran=record.count(s) - start)


def _watch(s: optuna.Study, procs: Sequence[BaseProcess], progress: worker.Progress | None) -> None:
    seen = {t.number for t in s.get_trials(deepcopy=False) if t.state.is_finished()}
    while True:
        alive = any(p.is_alive() for p in procs)
        # a stop first: workers stopped by the same signal are no error, their trials no news
        interrupt.check()
        new = [
            t
            for t in s.get_trials(deepcopy=False)
            if t.state.is_finished() and t.number not in seen
        ]
        for t in sorted(new, key=_completed):  # in the order the workers finished them
            seen.add(t.number)
            if progress is not None:
                progress(s, t)
        if not alive:
            return
        time.sleep(POLL_S)


def _completed(t: optuna.trial.FrozenTrial) -> tuple[float, int]:
    return (t.datetime_complete.timestamp() if t.datetime_complete else 0.0, t.number)


def _stop(procs: Sequence[BaseProcess], *, terminated: bool) -> None:
    """Stop every started worker: ask each to stop at its next safe point (SIGUSR2 for a SIGTERM,
    SIGUSR1 for a Ctrl-C, whether or not the signal reached the worker too), where it records its
    running trial; wait `TERM_GRACE_S` or `STOP_GRACE_S`, or until a second signal; then SIGTERM
    (a worker asked to stop already records its trial at once and exits), and SIGKILL after
    `KILL_GRACE_S` for any still there (its trial is then reaped as stale)."""
    started = [p for p in procs if p.pid is not None]
    with interrupt.escalation() as again:
        _send(started, signal.SIGUSR2 if terminated else signal.SIGUSR1)
        if _exited(started, TERM_GRACE_S if terminated else STOP_GRACE_S, again):
            return
        _send(started, signal.SIGTERM)
        if _exited(started, KILL_GRACE_S):
            return
        _send(started, signal.SIGKILL)
        _exited(started, KILL_GRACE_S)


def _send(procs: Sequence[BaseProcess], signum: int) -> None:
    for p in procs:
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signum)


def _exited(
    procs: Sequence[BaseProcess], seconds: float, again: threading.Event | None = None
) -> bool:
    """Wait until every process has exited (True), or `seconds` passed or `again` is set."""
    deadline = time.monotonic() + seconds
    for p in procs:
        while p.is_alive():
            if time.monotonic() >= deadline or (again is not None and again.is_set()):
                return False
            p.join(0.05)
    return True


def _raise_first_error(procs: Sequence[BaseProcess], errors: Any) -> None:
    for p in procs:
        p.join()
    messages = []
    with contextlib.suppress(queue.Empty):
        while True:
            messages.append(errors.get(timeout=0.1))
    if messages:
        _, message, code = messages[0]
        raise WorkerError(message, code)
    crashed = [p for p in procs if p.exitcode not in (0, None)]
    if crashed:
        p = crashed[0]
        raise WorkerError(
            f"worker process {p.name} (pid {p.pid}) exited with code {p.exitcode}; "
            "its trial, if any, is reaped as stale and retried",
            1,
        )
