"""Start N local worker processes on one study, watch them, and stop them together.

The parent creates or resumes the study (so every input is checked once), then spawns workers
that join it like `selector worker` would, each with its share of the cores. Progress is read from
the database, the one place all workers write to. An error in any worker is reported, never lost.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import optuna

from selector import interrupt, study, worker
from selector.errors import SelectorError
from selector.spec import StudySpec
from selector.storage import Heartbeat

POLL_S = 0.5
STOP_GRACE_S = 30.0


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
) -> None:
    worker.use_threads(threads)
    interrupt.defer()  # Ctrl-C reaches every worker: each stops at its next safe point
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study.work(url, name, limit=limit, timeout=timeout, heartbeat=heartbeat)
    except SelectorError as e:
        errors.put((os.getpid(), str(e), e.exit_code))
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


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
) -> worker.RunSummary:
    """Create or resume the study and run `workers` processes on it until its budget is spent."""
    s, _, _ = study.create_or_resume(spec, url)
    limit = study.budget_limit(s, spec.name, spec.n_trials, n_trials)
    start = worker.count(s)
    workers = max(1, min(workers, limit - start))  # no more workers than trials left to run
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    threads = threads or worker.torch_threads(workers)
    procs = [
        ctx.Process(
            target=_child,
            name=f"selector-worker-{i}",
            args=(url, spec.name, limit, timeout, heartbeat, threads, errors),
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        with interrupt.deferred():
            _watch(s, procs, progress)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    _raise_first_error(procs, errors)
    return worker.summarize(s, limit, ran=worker.count(s) - start)


def _watch(s: optuna.Study, procs: Sequence[BaseProcess], progress: worker.Progress | None) -> None:
    seen = {t.number for t in s.get_trials(deepcopy=False) if t.state.is_finished()}
    while True:
        alive = any(p.is_alive() for p in procs)
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
        interrupt.check()
        time.sleep(POLL_S)


def _completed(t: optuna.trial.FrozenTrial) -> tuple[float, int]:
    return (t.datetime_complete.timestamp() if t.datetime_complete else 0.0, t.number)


def _stop(procs: Sequence[BaseProcess]) -> None:
    """Ctrl-C: each worker records its running trial as interrupted at its next epoch, then
    exits (SIGUSR1: a stop at the next safe point, whether or not the terminal's SIGINT reached
    the worker too)."""
    for p in procs:
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGUSR1)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()


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
