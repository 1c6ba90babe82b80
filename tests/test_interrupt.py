"""Ctrl-C and SIGTERM at safe points: the first signal is deferred to `check()`, a second one
is not, nor a SIGTERM whose safe point does not come in time; `selector run` and `selector worker`
stopped by SIGTERM record their running trials as `terminated` and leave no process behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from selector import interrupt, launch
from selector.cli import app
from tests.conftest import small_raw, write_study


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


def test_first_sigterm_waits_for_a_safe_point_and_stops_as_terminated() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.deferred():
        interrupt.check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested()
        with pytest.raises(interrupt.Terminated) as stop:
            interrupt.check()
        assert isinstance(stop.value, KeyboardInterrupt)  # every Ctrl-C clean-up runs for it
        assert interrupt.exit_code(stop.value) == 143
    assert signal.getsignal(signal.SIGTERM) is before and not interrupt.requested()
    assert interrupt.exit_code(KeyboardInterrupt()) == 130


def test_a_second_signal_stops_at_once_with_the_first_signals_cause() -> None:
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(interrupt.Terminated):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_sigterm_whose_safe_point_does_not_come_stops_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An epoch longer than the grace: the stop comes anyway, before a container's SIGKILL."""
    monkeypatch.setattr(interrupt, "TERM_GRACE_S", 0.2)
    start = time.monotonic()
    with interrupt.deferred(), pytest.raises(interrupt.Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        while time.monotonic() - start < 10:  # a long epoch: no safe point
            time.sleep(0.01)
    assert 0.15 < time.monotonic() - start < 5


def test_a_stop_reached_in_time_disarms_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interrupt, "TERM_GRACE_S", 0.2)
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(interrupt.Terminated):
            interrupt.check()
        time.sleep(0.4)  # the clean-up after the safe point is not cut short
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_sigusr2_asks_for_termination_and_never_stops_at_once() -> None:
    with interrupt.deferred():
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(interrupt.Terminated):
            interrupt.check()


def test_a_nested_block_keeps_a_stop_asked_for_in_the_outer_one() -> None:
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with interrupt.deferred():
            assert interrupt.requested()
        assert interrupt.requested()
        with pytest.raises(interrupt.Terminated):
            interrupt.check()


def test_while_workers_are_stopped_a_further_signal_is_an_event_not_an_exception() -> None:
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with interrupt.escalation() as again:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            assert again.is_set()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()


def _stubborn(ignored: list[int], ready: Any) -> None:
    """A worker that never reaches a safe point: it ignores `ignored` and sleeps."""
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)
    ready.set()
    time.sleep(120)


@pytest.mark.parametrize(
    ("ignored", "ends_by"),
    [([signal.SIGUSR2], signal.SIGTERM), ([signal.SIGUSR2, signal.SIGTERM], signal.SIGKILL)],
)
def test_workers_that_do_not_stop_are_terminated_then_killed_after_a_grace(
    monkeypatch: pytest.MonkeyPatch, ignored: list[int], ends_by: int
) -> None:
    monkeypatch.setattr(launch, "TERM_GRACE_S", 0.3)
    monkeypatch.setattr(launch, "KILL_GRACE_S", 0.3)
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(2)]
    procs = [ctx.Process(target=_stubborn, args=(ignored, r)) for r in ready]
    for p in procs:
        p.start()
    assert all(r.wait(60) for r in ready)
    start = time.monotonic()
    launch._stop(procs, terminated=True)
    assert time.monotonic() - start < 5
    assert [p.exitcode for p in procs] == [-ends_by, -ends_by]


# --- SIGTERM end to end: `selector run` (1 and 2 workers) and `selector worker` ---------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Trials of many short epochs, scores written each epoch (the median pruner acts from epoch 3 but
# prunes nothing before its 5th trial): one is mid-trial, training, when the signal comes.
SLOW = small_raw(
    n_trials=4,
    training={"max_epochs": 5000, "patience": 5000},
    search={"pruner": "median"},
    space={"width": 64, "depth": 2, "lr": 1e-3, "batch_size": 4, "optimizer": "adam"},
)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state first), None for no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited


def _tree(root: int) -> set[int]:
    """`root` and all its descendants now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _training(db: Path) -> int:
    """Running trials that have reported an epoch."""
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT COUNT(DISTINCT t.trial_id) FROM trials t JOIN trial_intermediate_values v "
                "ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'"
            ).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # not created yet, or busy
        return 0


@pytest.mark.parametrize(
    ("command", "workers", "group"),
    [
        pytest.param("run", 1, False, id="run-1-worker"),
        pytest.param("run", 2, False, id="run-2-workers-parent-signalled"),
        pytest.param("run", 2, True, id="run-2-workers-group-signalled"),
        pytest.param("worker", 1, False, id="worker"),
    ],
)
def test_sigterm_records_running_trials_as_terminated_and_leaves_no_process(
    tmp_path: Path, command: str, workers: int, group: bool
) -> None:
    """SIGTERM to the parent alone (Kubernetes, `docker stop`) or to its whole process group
    (`timeout`, systemd, Slurm): every running trial is FAIL `terminated`, none stays RUNNING,
    every process is gone within seconds, exit code 143 and one line on stderr."""
    study_file = write_study(tmp_path / "slow.toml", SLOW)
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    if command == "run":
        args = ["run", str(study_file), "--workers", str(workers)]
    else:
        assert CliRunner().invoke(app, ["create", str(study_file), "--storage", url]).exit_code == 0
        args = ["worker", "iris-small"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "selector.cli", *args, "--storage", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group, as under a service manager
    )
    deadline = time.monotonic() + 180
    while _training(db) < workers and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _training(db) == workers, proc.communicate(timeout=60)
    tree = _tree(proc.pid)
    assert len(tree) >= 1 + (workers if workers > 1 else 0)
    sent = time.monotonic()
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    while any(_alive(p) for p in tree) and time.monotonic() - sent < 30:
        time.sleep(0.05)
    assert not [p for p in tree if _alive(p)], "a process outlived the stop"
    assert time.monotonic() - sent < 20
    assert proc.returncode == 143, err
    assert err.splitlines() == [
        "selector: terminated (SIGTERM); finished trials are kept, run again to resume"
    ], err
    trials = optuna.load_study(study_name="iris-small", storage=url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == workers
    assert {t.user_attrs.get("fail_reason") for t in failed} == {"terminated"}
    assert f"trials finished when the run stopped ({workers} failed in all)" in out, out
    status = CliRunner().invoke(app, ["status", "iris-small", "--storage", url])
    assert f"terminated {workers}" in status.output, status.output
