"""The command line as a user meets it: real study files, real processes where it matters."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from selector import spec, worker
from selector.cli import app
from tests.conftest import ROOT, small_raw, write_study

runner = CliRunner()


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    return write_study(tmp_path / "iris.toml", small_raw(n_trials=2))


def _sel(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def test_run_status_export_final(study_file: Path, url: str, tmp_path: Path) -> None:
    code, out = _sel("run", str(study_file), "--storage", url)
    assert code == 0, out
    assert "2/2 trials finished; best accuracy" in out
    # one progress line per trial (stderr is not a terminal): scores and epochs, no diagnosis
    progress = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert len(progress) == 2, out
    for line in progress:
        assert re.fullmatch(
            r"\[\d/2\] trial \d+: \d\.\d{4} ± \d\.\d{4} at epoch \d+ of \d+"
            r"(, stopped on a perfect score)? \(train \d\.\d{4}\)",
            line,
        ), line

    code, out = _sel("status", str(study_file), "--storage", url, "--json")
    info = json.loads(out)
    assert info["finished"] == 2 and info["test_set"]["state"] == "sealed"

    code, out = _sel("status", "iris-small", "--storage", url)
    assert code == 0 and "2/2 finished" in out
    assert "test set   sealed: not opened yet; `selector final` evaluates it, once" in out

    code, out = _sel("studies", "--storage", url)
    assert code == 0 and "iris-small" in out

    code, out = _sel(
        "export",
        "iris-small",
        "--storage",
        url,
        "--format",
        "yaml",
        "-o",
        str(tmp_path / "best.yaml"),
    )
    assert code == 0 and (tmp_path / "best.yaml").read_text().startswith("study: iris-small")

    code, out = _sel("final", "iris-small", "--storage", url)
    assert code == 0 and "test accuracy = " in out
    code, again = _sel("final", "iris-small", "--storage", url)
    assert code == 1 and "already evaluated" in again
    code, out = _sel("status", "iris-small", "--storage", url, "--json")
    assert json.loads(out)["test_set"]["state"] == "evaluated"


def test_final_before_the_budget_is_spent_needs_early_and_seals_the_study(
    study_file: Path, url: str
) -> None:
    assert _sel("run", str(study_file), "--storage", url, "--n-trials", "1")[0] == 0
    code, out = _sel("final", "iris-small", "--storage", url)
    assert code == 1 and "1 of its n_trials = 2 finished trials" in out and "--early" in out
    code, out = _sel("status", "iris-small", "--storage", url, "--json")
    assert json.loads(out)["test_set"]["state"] == "sealed"  # the refusal opened nothing

    code, out = _sel("final", "iris-small", "--storage", url, "--early")
    assert code == 0 and "test accuracy = " in out, out
    # sealed: no trial may run after the test set was opened, from either command
    code, out = _sel("run", str(study_file), "--storage", url)
    assert code == 1 and "is sealed" in out, out
    code, out = _sel("worker", "iris-small", "--storage", url)
    assert code == 1 and "is sealed" in out, out
    trials = optuna.load_study(study_name="iris-small", storage=url).trials
    assert len(trials) == 1


def test_run_again_after_the_budget_has_nothing_to_do_unless_strict(
    study_file: Path, url: str
) -> None:
    assert _sel("run", str(study_file), "--storage", url)[0] == 0
    code, out = _sel("run", str(study_file), "--storage", url)
    assert code == 0 and "nothing to do, all 2 trials finished" in out
    code, out = _sel("run", str(study_file), "--storage", url, "--strict")
    assert code == 1 and "raise n_trials" in out


def test_create_runs_no_trial(study_file: Path, url: str) -> None:
    code, out = _sel("create", str(study_file), "--storage", url)
    assert code == 0 and "120 dev rows in 3 folds, 30 test rows held back" in out
    assert optuna.load_study(study_name="iris-small", storage=url).trials == []


def test_storage_from_environment(
    study_file: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SELECTOR_STORAGE", url)
    assert _sel("run", str(study_file))[0] == 0
    assert "iris-small" in _sel("studies")[1]


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _finished(db: Path) -> int:
    return _count(db, "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')")


def _running_and_training(db: Path) -> bool:
    return (
        _count(
            db,
            "SELECT COUNT(*) FROM trials t JOIN trial_user_attributes a "
            "ON a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'seed'",
        )
        > 0
    )


def test_ctrl_c_keeps_finished_trials_and_run_resumes_to_the_exact_budget(tmp_path: Path) -> None:
    """Run with n_trials 6, Ctrl-C after 3 finished, run again: exactly 6 finished trials."""
    raw = small_raw(
        n_trials=6,
        training={"max_epochs": 40, "patience": 40},
        space={"width": 64, "depth": 2, "lr": 1e-4, "batch_size": 8},
    )
    study_file = write_study(tmp_path / "slow.toml", raw)
    db = tmp_path / "s.db"
    cmd = [
        sys.executable,
        "-m",
        "selector.cli",
        "run",
        str(study_file),
        "--storage",
        f"sqlite:///{db}",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (_finished(db) >= 3 and _running_and_training(db)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the run and its workers
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "run again to resume" in out
    trials = optuna.load_study(study_name="iris-small", storage=f"sqlite:///{db}").trials
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    # one trial per worker was training (one worker per core by default)
    assert 1 <= len(interrupted) <= worker.default_workers(spec.load(study_file))
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    kept = _finished(db)
    assert kept >= 3
    # where the study stands, as the stop left it (trials ending with it print no line)
    stood = f"study 'iris-small': {kept}/6 trials finished when the run stopped"
    assert f"{stood} ({len(interrupted)} failed in all)" in out, out

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _finished(db) == 6


@pytest.mark.slow
def test_make_demo_reaches_the_target_test_accuracy(tmp_path: Path) -> None:
    """The README's first command, on a clean copy: digits test accuracy >= 0.97."""
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "VENV": str(venv)}
    subprocess.run(["git", "clone", "-q", str(ROOT), str(tmp_path / "repo")], check=True)
    # The clone's pyproject.toml is newer than the test's venv: make would install the clone
    # into it (`pip install -e`), and that venv's `selector` would import the temporary copy
    # from then on. Dated a second before the venv's install stamp (nanoseconds: a float's
    # rounding can land after it), make uses the venv as it is.
    stamp = (venv / ".installed").stat().st_mtime_ns - 1_000_000_000
    os.utime(tmp_path / "repo" / "pyproject.toml", ns=(stamp, stamp))
    out = subprocess.run(
        ["make", "demo", f"VENV={env['VENV']}"],
        cwd=tmp_path / "repo",
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("test accuracy = "))
    assert float(line.split()[3]) >= 0.97
