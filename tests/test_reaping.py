"""Stale trials are reaped by the grace their own worker runs with, and never by a read."""

from __future__ import annotations

import json

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from selector import record, spec, storage, study, summary, worker
from selector.record import HEARTBEAT_ATTR
from tests.conftest import small_raw


def _running_trial(url: str, grace: int | None, silent_s: int) -> int:
    """A running trial whose last heartbeat was `silent_s` seconds ago, recorded by a worker
    with `grace` (None: a trial without the record)."""
    store = storage.open_storage(url, must_exist=True, heartbeat=storage.Heartbeat(1, 120))
    s = optuna.load_study(study_name="iris-small", storage=store)
    trial = s.ask()
    if grace is not None:
        storage.write_trial(trial, system_attrs={HEARTBEAT_ATTR: {"interval": 10, "grace": grace}})
    store.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
    with storage.engine(url).begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, :ago) "
                "WHERE trial_id = :t"
            ),
            {"ago": f"-{silent_s} seconds", "t": trial._trial_id},
        )
    return trial.number


@pytest.fixture
def created(url: str) -> str:
    study.create_or_resume(spec.parse(small_raw(), origin="t.toml"), url)
    return url


def _state(url: str, number: int) -> TrialState:
    s, _ = record.open_study(url, "iris-small")
    return s.get_trials(deepcopy=False)[number].state


def _reap_with_grace(url: str, grace: int) -> None:
    store = storage.open_storage(url, must_exist=True, heartbeat=storage.Heartbeat(1, grace))
    worker.reap_stale(optuna.load_study(study_name="iris-small", storage=store))


def test_a_worker_with_a_short_grace_leaves_a_long_grace_trial_running(created: str) -> None:
    # the worker runs with --heartbeat 200 --grace 600; its trial is silent for 144 s
    number = _running_trial(created, grace=600, silent_s=144)
    _reap_with_grace(created, grace=120)
    assert _state(created, number) == TrialState.RUNNING


def test_a_trial_silent_past_its_own_grace_is_reaped_and_retried(created: str) -> None:
    number = _running_trial(created, grace=600, silent_s=700)
    _reap_with_grace(created, grace=3600)  # the reaper's own grace does not matter
    s, _ = record.open_study(created, "iris-small")
    trials = s.get_trials(deepcopy=False)
    assert trials[number].state == TrialState.FAIL
    assert record.failure_reason(trials[number]) == "stale"
    assert [t.state for t in trials[number + 1 :]] == [TrialState.WAITING]  # its retry


def test_a_trial_without_a_record_is_reaped_by_the_reapers_grace(created: str) -> None:
    number = _running_trial(created, grace=None, silent_s=200)
    _reap_with_grace(created, grace=120)
    assert _state(created, number) == TrialState.FAIL


def test_status_shows_a_silent_trial_and_reaps_nothing(created: str) -> None:
    number = _running_trial(created, grace=60, silent_s=700)
    st = summary.status(created, "iris-small")
    assert st.states["running"] == 1 and st.silent == [number]
    assert f"silent     trial {number}: no heartbeat" in summary.status_text(st)
    assert _state(created, number) == TrialState.RUNNING
    fresh = _running_trial(created, grace=600, silent_s=30)
    assert summary.status(created, "iris-small").silent == [number]
    assert _state(created, fresh) == TrialState.RUNNING


def test_the_worker_records_its_heartbeat_with_each_trial(created: str) -> None:
    worker_spec = spec.parse(small_raw(n_trials=1), origin="t.toml")
    study.run(worker_spec, created, heartbeat=storage.Heartbeat(7, 99))
    s, _ = record.open_study(created, "iris-small")
    (t,) = s.get_trials(deepcopy=False)
    assert t.system_attrs[HEARTBEAT_ATTR] == {"interval": 7, "grace": 99}
    with storage.engine(created).connect() as conn:
        row = conn.execute(sa.text("SELECT heartbeat_s, grace_s FROM selector_workers")).one()
    assert tuple(row) == (7, 99)
    assert json.dumps(t.system_attrs[HEARTBEAT_ATTR])
