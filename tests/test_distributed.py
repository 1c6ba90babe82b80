"""Workers on one study: exact budgets, crash recovery, reconnects, distinct seeds, the gRPC proxy.

The PostgreSQL tests run against the real server on 127.0.0.1:5432 (marker `postgres`)."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from selector import record, spec, storage, study, worker
from tests.conftest import PENGUINS, small_raw, write_study

FAST = {"max_epochs": 2, "patience": 2, "device": "cpu"}
FAST_SPACE = {
    "width": [8, 16],
    "depth": {"low": 1, "high": 2},
    "lr": {"low": 1e-3, "high": 1e-1, "log": True},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BEAT = ["--heartbeat", "1", "--grace", "4"]


def _create(url: str, **overrides: Any) -> spec.StudySpec:
    raw = small_raw(**{"training": FAST, "space": FAST_SPACE, **overrides})
    s = spec.parse(raw, origin="t.toml")
    study.create_or_resume(s, url)
    return s


def _worker(url: str, name: str = "iris-small", *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "selector", "worker", name, "--storage", url, *BEAT, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text))
    return out


def _trials(url: str, name: str = "iris-small") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(
        study_name=name, storage=storage.open_storage(url, must_exist=True)
    ).trials


def _count(url: str, states: tuple[TrialState, ...] = worker.FINISHED) -> int:
    return sum(t.state in states for t in _trials(url))


def _wait(cond: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def _assert_exact(url: str, n: int) -> None:
    trials = _trials(url)
    assert sum(t.state in worker.FINISHED for t in trials) == n
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))


# --- SQLite ----------------------------------------------------------------------------------


def test_three_local_workers_on_sqlite_exact_budget_no_lock_errors(tmp_path: Path) -> None:
    # trials one at a time, long enough (200 epochs) that the first worker cannot finish the
    # study before the others have started
    training = {**FAST, "max_epochs": 200, "patience": 200}
    raw = small_raw(
        n_trials=9,
        training=training,
        space=FAST_SPACE,
        search={"sampler": "random", "pruner": "none", "fuse": 1},
    )
    f = write_study(tmp_path / "s.toml", raw)
    url = f"sqlite:///{tmp_path / 's.db'}"
    cmd = [sys.executable, "-m", "selector", "run", str(f), "--storage", url, "--workers", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "locked" not in r.stderr + r.stdout
    _assert_exact(url, 9)
    assert len({t.user_attrs["worker"] for t in _trials(url)}) == 3


def test_run_starts_no_more_workers_than_trials_left(tmp_path: Path) -> None:
    raw = small_raw(n_trials=4, training=FAST, space=FAST_SPACE)
    f = write_study(tmp_path / "s.toml", raw)
    url = f"sqlite:///{tmp_path / 's.db'}"
    base = [sys.executable, "-m", "selector", "run", str(f), "--storage", url]
    r = subprocess.run([*base, "--n-trials", "3"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*base, "--workers", "4"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    _assert_exact(url, 4)
    with sa.create_engine(url).connect() as conn:  # one worker id handed out per worker started
        started = conn.execute(sa.text("SELECT COUNT(*) FROM selector_workers")).scalar()
    assert started == worker.default_workers(spec.load(f), 3) + 1


def test_worker_refuses_data_that_differ(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    pd.read_csv(PENGUINS).to_csv(csv, index=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    raw = small_raw(name="peng", data={"path": str(csv), "target": "species"})
    raw["data"].pop("source")
    study.create_or_resume(spec.parse(raw, origin="p.toml"), url)
    other = tmp_path / "other.csv"
    pd.read_csv(PENGUINS).iloc[:-5].to_csv(other, index=False)
    with pytest.raises(study.StudyError, match="differ from the study's"):
        study.join(url, "peng", data_path=str(other))
    assert study.join(url, "peng", data_path=str(csv)).n_trials == 3


def test_a_result_after_its_trial_was_reaped_is_kept_and_never_crashes(url: str) -> None:
    _create(url)
    store = storage.open_storage(url, must_exist=True, heartbeat=storage.Heartbeat(1, 2))
    s = optuna.load_study(study_name="iris-small", storage=store)
    trial = s.ask()
    store.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # reaped meanwhile
    frozen = worker._tell(s, trial, 0.9, TrialState.COMPLETE)
    assert frozen.state == TrialState.FAIL
    assert s.user_attrs[f"late_result:{trial.number}"]["value"] == 0.9


def test_failed_trials_free_their_place_in_the_budget(url: str) -> None:
    s = _create(url, n_trials=3)
    st = optuna.load_study(study_name=s.name, storage=url)
    for _ in range(3):
        t = st.ask()
        st.tell(t, state=TrialState.FAIL)
    assert worker.claim(st, url, 3) is not None
    for _ in range(2):
        st.tell(st.ask(), 0.5)
    assert worker.claim(st, url, 3) is None  # 2 complete + 1 running = the whole budget


# --- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_four_workers_finish_exactly_the_budget(pg_url: str) -> None:
    _create(pg_url, n_trials=40)
    results = _finish([_worker(pg_url) for _ in range(4)])
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    _assert_exact(pg_url, 40)


@pytest.mark.postgres
def test_killed_worker_trial_goes_stale_and_is_retried(pg_url: str) -> None:
    slow = {"max_epochs": 600, "patience": 600, "device": "cpu"}
    _create(pg_url, n_trials=2, training=slow, space={"width": 32, "batch_size": 8, "lr": 1e-4})
    victim = _worker(pg_url)
    _wait(
        lambda: any(
            t.state == TrialState.RUNNING and "seed" in t.user_attrs for t in _trials(pg_url)
        )
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = next(t for t in _trials(pg_url) if t.state == TrialState.RUNNING)
    # the next worker reaps it once its heartbeat is older than the grace period
    fast = ["--heartbeat", "1", "--grace", "3"]
    cmd = [sys.executable, "-m", "selector", "worker", "iris-small", "--storage", pg_url, *fast]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    trials = _trials(pg_url)
    stale = trials[killed.number]
    assert stale.state == TrialState.FAIL and record.failure_reason(stale) == "stale"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params
    assert retry[0].state in worker.FINISHED
    _assert_exact(pg_url, 2)


@pytest.mark.postgres
def test_workers_reconnect_after_their_connections_are_terminated(pg_url: str) -> None:
    """Every connection of the study's database is terminated three times while two workers
    run: as they start and claim, mid-study, and later. Both finish, with the exact budget."""
    _create(pg_url, n_trials=24)
    procs = [_worker(pg_url) for _ in range(2)]
    database = sa.make_url(pg_url).database
    admin = sa.create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    killed = []
    for finished in (1, 4, 8):
        _wait(lambda n=finished: _count(pg_url) >= n)  # type: ignore[misc]
        with admin.connect() as conn:
            killed.append(
                conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).scalar()
            )
    admin.dispose()
    assert sum(killed) >= 2, killed
    results = _finish(procs)
    assert [code for code, _ in results] == [0, 0], results
    _assert_exact(pg_url, 24)


@pytest.mark.postgres
@pytest.mark.slow
def test_eight_workers_started_at_once_draw_different_params(pg_url: str) -> None:
    _create(pg_url, n_trials=8, search={"sampler": "tpe", "pruner": "none"})
    results = _finish([_worker(pg_url) for _ in range(8)])
    assert all(code == 0 for code, _ in results), results
    first = sorted(_trials(pg_url), key=lambda t: t.number)[:8]
    params = [tuple(sorted(t.params.items())) for t in first]
    assert len(set(params)) == 8
    assert len({t.user_attrs["worker"] for t in first}) >= 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.postgres
@pytest.mark.slow
def test_four_workers_through_the_grpc_proxy_finish_a_study(pg_url: str) -> None:
    _create(pg_url, n_trials=12)
    with _proxy(pg_url) as grpc_url:
        results = _finish([_worker(grpc_url) for _ in range(4)])
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    finished = _count(pg_url)
    assert 12 <= finished <= 12 + 3  # through the proxy no lock spans count and ask


def test_a_worker_through_the_grpc_proxy_refuses_a_study_whose_test_set_was_opened(
    url: str,
) -> None:
    """A proxy serves only Optuna's storage, not selector's tables: `final` marks its claim in
    the study itself too, and a worker joining through a proxy reads it and runs nothing."""
    from selector import final

    s = _create(url, n_trials=2)
    study.run(s, url)
    final.evaluate(url, "iris-small")
    with _proxy(url) as grpc_url:
        store = storage.open_storage(grpc_url, must_exist=True)
        opened = record.test_set_opened(grpc_url, record.load_study(store, grpc_url, "iris-small"))
        [(code, out)] = _finish([_worker(grpc_url, "iris-small", "--n-trials", "1")])
    direct = record.test_set_opened(url, optuna.load_study(study_name="iris-small", storage=url))
    assert opened is not None and direct is not None
    assert (opened.trial, record.shown_time(opened.claimed_at)) == (
        direct.trial,
        record.shown_time(direct.claimed_at),
    )
    assert code == 1 and "is sealed" in out, out
    assert _count(url) == 2


@contextlib.contextmanager
def _proxy(url: str) -> Iterator[str]:
    """`selector proxy` serving `url`, for the duration: its grpc:// URL, once it answers."""
    port = _free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "selector", "proxy", "--storage", url, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        grpc_url = f"grpc://127.0.0.1:{port}"
        _wait(lambda: _proxy_up(grpc_url), timeout=60)
        yield grpc_url
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.wait(timeout=30)


def _proxy_up(url: str) -> bool:
    try:
        storage.check(url, must_exist=True)
        return True
    except storage.StorageError:
        return False


def _cli(*args: str) -> int:
    from typer.testing import CliRunner

    from selector.cli import app

    return CliRunner().invoke(app, list(args)).exit_code


def test_status_never_reaps_a_trial_whose_worker_died_a_worker_does(url: str) -> None:
    from selector import summary

    _create(url)
    store = storage.open_storage(url, must_exist=True, heartbeat=storage.Heartbeat(1, 2))
    s = optuna.load_study(study_name="iris-small", storage=store)
    trial = s.ask()
    store.record_heartbeat(trial._trial_id)
    sa_engine = storage.engine(url)
    with sa_engine.begin() as conn:  # the heartbeat is old: its worker died long ago
        conn.execute(sa.text("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00'"))
    for _ in range(2):  # read-only: shown as running (and silent), left for the workers
        info = summary.status(url, "iris-small").as_dict()
        assert info["states"]["running"] == 1 and info["failures"] == {}
        assert info["silent_running"] == [trial.number]
        assert info["states"]["fail"] == 0 and info["states"]["waiting"] == 0
    code = _cli("status", "iris-small", "--storage", url)
    assert code == 0 and _trials(url)[trial.number].state == TrialState.RUNNING
    worker.reap_stale(s)
    info = summary.status(url, "iris-small").as_dict()
    assert info["states"]["running"] == 0 and info["failures"] == {"stale": 1}
    assert info["states"]["waiting"] == 1  # queued for its retry


def test_a_trial_that_never_beat_is_reaped_after_twice_the_grace(url: str) -> None:
    """A worker lost between `ask` and the trial's first heartbeat (a connection dropped mid-ask)
    leaves a running trial without a heartbeat, which Optuna's stale check passes over; it must not
    hold its place in the budget for ever."""
    _orphan_is_reaped(url)


@pytest.mark.postgres
def test_a_trial_that_never_beat_is_reaped_on_postgresql(pg_url: str) -> None:
    _orphan_is_reaped(pg_url)


def _orphan_is_reaped(url: str) -> None:
    _create(url, n_trials=2)
    st = optuna.load_study(
        study_name="iris-small",
        storage=storage.open_storage(url, must_exist=True, heartbeat=storage.Heartbeat(1, 4)),
    )
    orphan, fresh = st.ask(), st.ask()
    engine = storage.engine(url)
    with engine.begin() as conn:  # the orphan started 10 s ago (more than 2 x grace)
        conn.execute(
            sa.text("UPDATE trials SET datetime_start = :t WHERE trial_id = :i"),
            {
                "t": orphan.datetime_start.astimezone(datetime.UTC).replace(tzinfo=None)  # type: ignore[union-attr]
                - datetime.timedelta(seconds=10),
                "i": orphan._trial_id,
            },
        )
    assert storage.orphaned_trial_ids(st) == [orphan._trial_id]
    worker.reap_stale(st)
    states = {t.number: t.state for t in _trials(url)}
    assert states == {orphan.number: TrialState.FAIL, fresh.number: TrialState.RUNNING}
    assert record.failure_reason(_trials(url)[orphan.number]) == "stale"
    assert worker.claim(st, url, 2) is not None  # its place is free again
