"""Storage URLs, SQLite settings, and the same study on a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from selector import db, final, spec, storage, study
from selector.errors import ConnectionLost, StorageError
from tests.conftest import PG_ADMIN, small_raw


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_url() == f"sqlite:///{tmp_path / 'selector.db'}"
    assert storage.resolve_url(None, "sqlite:///from_file.db").endswith("/from_file.db")
    monkeypatch.setenv("SELECTOR_STORAGE", "sqlite:///env.db")
    assert storage.resolve_url(None, "sqlite:///from_file.db").endswith("/env.db")
    assert storage.resolve_url("sqlite:///cli.db", "sqlite:///f.db").endswith("/cli.db")


def test_password_is_masked() -> None:
    masked = storage.mask("postgresql://user:s3cret@db.example:5432/x")
    assert "s3cret" not in masked and "user" in masked


def test_sqlite_runs_in_wal_mode(url: str, tmp_path: Path) -> None:
    study.create_or_resume(spec.parse(small_raw(), origin="t.toml"), url)
    with sqlite3.connect(tmp_path / "selector.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.postgres
def test_a_study_runs_and_is_evaluated_on_postgresql(pg_url: str) -> None:
    s = spec.parse(small_raw(n_trials=2), origin="t.toml")
    assert study.run(s, pg_url).finished == 2
    assert len(optuna.load_study(study_name="iris-small", storage=pg_url).trials) == 2
    result = final.evaluate(pg_url, "iris-small").result
    assert result.state == "finished"
    with pytest.raises(final.LockboxError):
        final.evaluate(pg_url, "iris-small")


def _write_both_ways(url: str) -> tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]:
    """The same attrs, system attrs and scores written by `write_trial` (one transaction) and by
    Optuna's one-call-per-value API, read back through Optuna."""
    study_ = optuna.create_study(storage=storage.open_storage(url, must_exist=False))
    attrs = {"config": {"width": 32, "lr": 1e-3}, "curve": [0.5, float("nan")], "label": "ok"}
    scores = [(1, 0.25), (2, float("nan")), (3, float("inf")), (4, -float("inf"))]
    batched, one_by_one = study_.ask(), study_.ask()
    system = {"selector:curves": {"v": 1, "scores": "eJwDAAAAAAE="}, "selector:heartbeat": 1}
    storage.write_trial(batched, user_attrs={"label": "first"})  # an upsert overwrites it
    storage.write_trial(batched, system_attrs={"selector:heartbeat": 0})
    storage.write_trial(batched, user_attrs=attrs, system_attrs=system, intermediate=scores[:2])
    storage.write_trial(batched, intermediate=[(2, 9.0), *scores[2:]])  # step 2: kept, as report
    storage.write_trial(batched, study_system_attrs={"note:a": 1})  # the study's, upserted too
    storage.write_trial(batched, study_system_attrs={"note:a": [2], "note:b": "x"})
    assert study_._storage.get_study_system_attrs(study_._study_id) == {
        "note:a": [2],
        "note:b": "x",
    }
    for key, value in attrs.items():
        one_by_one.set_user_attr(key, value)
    for key, value in system.items():
        one_by_one.storage.set_trial_system_attr(one_by_one._trial_id, key, value)
    for step, value in scores:
        one_by_one.report(value, step)
    assert batched.user_attrs == one_by_one.user_attrs  # the trials' own cached copies
    assert batched._cached_frozen_trial.system_attrs == system  # its cached copy too
    a, b = (
        storage.retrying(lambda t=t: study_._storage.get_trial(t._trial_id))
        for t in (batched, one_by_one)
    )  # type: ignore[misc]
    return a, b


def _same(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> None:
    import json

    assert json.dumps(a.user_attrs) == json.dumps(b.user_attrs)
    assert json.dumps(a.system_attrs) == json.dumps(b.system_attrs)
    assert a.system_attrs["selector:heartbeat"] == 1
    assert json.dumps(a.intermediate_values) == json.dumps(b.intermediate_values)
    assert list(a.intermediate_values) == [1, 2, 3, 4]


def test_write_trial_stores_what_report_and_set_user_attr_store(url: str) -> None:
    _same(*_write_both_ways(url))


@pytest.mark.postgres
def test_write_trial_on_postgresql(pg_url: str) -> None:
    _same(*_write_both_ways(pg_url))


def test_write_trial_refuses_a_finished_trial_and_writes_nothing(url: str) -> None:
    study_ = optuna.create_study(storage=storage.open_storage(url, must_exist=False))
    trial = study_.ask()
    study_.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.write_trial(
            trial,
            user_attrs={"late": 1},
            system_attrs={"late": 1},
            intermediate=[(1, 0.5)],
            study_system_attrs={"late": 1},
        )
    assert study_._storage.get_study_system_attrs(study_._study_id) == {}
    frozen = study_.trials[0]
    assert "late" not in frozen.user_attrs and frozen.intermediate_values == {}
    assert "late" not in frozen.system_attrs


def test_write_trial_on_other_storages_calls_optuna_per_value() -> None:
    study_ = optuna.create_study()  # in memory: no SQL database behind it
    trial = study_.ask()
    storage.write_trial(
        trial,
        user_attrs={"a": 1},
        system_attrs={"b": 2},
        intermediate=[(1, 0.5), (2, 0.6)],
        study_system_attrs={"c": 3},
    )
    assert study_._storage.get_study_system_attrs(study_._study_id) == {"c": 3}
    assert study_.trials[0].user_attrs == {"a": 1}
    assert study_.trials[0].system_attrs == {"b": 2}
    assert study_.trials[0].intermediate_values == {1: 0.5, 2: 0.6}


def _end_both_ways(url: str) -> list[tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]]:
    """Trials ended by `worker.end_trials` (their last writes and states in one transaction)
    and twins ended by `Study.tell`: complete, pruned (its value Optuna's, the last score) and
    failed; read back by a fresh Optuna storage."""
    from selector import worker

    study_ = optuna.create_study(
        storage=storage.open_storage(url, must_exist=False), direction="maximize"
    )
    ends = [
        (optuna.trial.TrialState.COMPLETE, 0.75, [(1, 0.5), (2, 0.75)]),
        (optuna.trial.TrialState.PRUNED, 0.25, [(1, 0.5), (3, 0.25)]),
        (optuna.trial.TrialState.FAIL, None, [(1, 0.5)]),
    ]
    ours, theirs = [], []
    for _ in ends:
        ours.append(study_.ask())
        theirs.append(study_.ask())
    frozen = worker.end_trials(
        study_,
        [
            storage.TrialWrite(t, {"seconds": 1.5}, {}, scores, {}, state, value)
            for t, (state, value, scores) in zip(ours, ends, strict=True)
        ],
    )
    for t, (state, value, scores) in zip(theirs, ends, strict=True):
        t.set_user_attr("seconds", 1.5)
        for step, v in scores:
            t.report(v, step)
        study_.tell(t, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    assert [f.state for f in frozen] == [state for state, _, _ in ends]
    fresh = optuna.load_study(study_name=study_.study_name, storage=url)
    by_number = {t.number: t for t in fresh.get_trials()}
    for f in frozen:  # what the worker's progress sees is what is stored
        stored = by_number[f.number]
        assert (f.state, f.values, f.user_attrs) == (stored.state, stored.values, stored.user_attrs)
    return [(by_number[a.number], by_number[b.number]) for a, b in zip(ours, theirs, strict=True)]


def _ended_alike(pairs: list[tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]]) -> None:
    for a, b in pairs:
        assert (a.state, a.values, a.user_attrs, a.intermediate_values) == (
            b.state,
            b.values,
            b.user_attrs,
            b.intermediate_values,
        )
        assert a.datetime_complete is not None and a.datetime_start is not None
        assert a.datetime_complete >= a.datetime_start


def test_trials_end_together_as_tell_ends_them(url: str) -> None:
    _ended_alike(_end_both_ways(url))


@pytest.mark.postgres
def test_trials_end_together_on_postgresql(pg_url: str) -> None:
    _ended_alike(_end_both_ways(pg_url))


def _heartbeats_with_the_start(url: str) -> None:
    """A write with `heartbeat` records the trial's heartbeat as Optuna's `record_heartbeat`
    does (the database's clock: not stale to Optuna's own check), and again on a second write."""
    store = storage.open_storage(url, must_exist=False, heartbeat=storage.Heartbeat(10, 20))
    st = optuna.create_study(storage=store)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's: meant for optimize()
        beaten, silent = st.ask(), st.ask()
    storage.write_trials([storage.TrialWrite(beaten, {"a": 1}, heartbeat=True)])
    storage.write_trials([storage.TrialWrite(silent, {"a": 1})])
    rdb = storage._rdb_behind(st._storage)
    assert rdb is not None
    with rdb.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT trial_id, heartbeat FROM trial_heartbeats")).all()
    assert [r[0] for r in rows] == [beaten._trial_id]
    storage.write_trials([storage.TrialWrite(beaten, {"b": 2}, heartbeat=True)])  # an upsert
    assert rdb._get_stale_trial_ids(st._study_id) == []
    assert storage.orphaned_trial_ids(st) == []  # neither started long ago


def test_a_trials_heartbeat_is_written_with_its_start(url: str) -> None:
    _heartbeats_with_the_start(url)


@pytest.mark.postgres
def test_a_trials_heartbeat_is_written_with_its_start_on_postgresql(pg_url: str) -> None:
    _heartbeats_with_the_start(pg_url)


def test_ending_trials_writes_nothing_when_one_was_reaped(url: str) -> None:
    """A member reaped as stale meanwhile: the whole end is refused and nothing written (the
    worker then tells each member as a lone trial, and the reaped one's result is kept as a
    late result)."""
    from selector import worker

    study_ = optuna.create_study(storage=storage.open_storage(url, must_exist=False))
    alive, reaped = study_.ask(), study_.ask()
    study_._storage.set_trial_state_values(reaped._trial_id, optuna.trial.TrialState.FAIL)
    writes = [
        storage.TrialWrite(t, {"seconds": 1.0}, {}, [(1, 0.5)], {}, optuna.trial.TrialState.PRUNED)
        for t in (alive, reaped)
    ]
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        worker.end_trials(study_, writes)
    stored = optuna.load_study(study_name=study_.study_name, storage=url).get_trials()
    assert [t.state for t in stored] == [
        optuna.trial.TrialState.RUNNING,
        optuna.trial.TrialState.FAIL,
    ]
    assert all(not t.user_attrs and not t.intermediate_values for t in stored)


def _created_together(url: str) -> None:
    """`storage.new_trials` numbers trials as `Study.ask` would, per study, in one transaction;
    each one's first read-back is served from memory, once."""
    from selector import record

    store = storage.open_storage(url, must_exist=False)
    a = optuna.create_study(storage=store, study_name="a")
    b = optuna.create_study(storage=store, study_name="b")
    a.ask()
    b.ask()
    ids = storage.new_trials(a, 3)
    assert ids is not None and len(ids) == 3
    b.ask()
    last = a.ask()
    assert last.number == 4
    with record.core_trial_reads(a):
        trials = [optuna.Trial(a, i) for i in ids]
        assert a._storage.__dict__.get("_selector_fresh") == {}  # each served once
    assert [t.number for t in trials] == [1, 2, 3]
    trials[0].suggest_float("x", 0.0, 1.0)
    a.tell(trials[0], 0.5)
    fresh = optuna.load_study(study_name="a", storage=url).get_trials()
    assert [t.number for t in fresh] == [0, 1, 2, 3, 4]
    assert [t.state for t in fresh][2:] == [optuna.trial.TrialState.RUNNING] * 3
    assert fresh[1].state == optuna.trial.TrialState.COMPLETE and "x" in fresh[1].params
    assert all(t.datetime_start is not None for t in fresh)
    assert [t.number for t in optuna.load_study(study_name="b", storage=url).get_trials()] == [0, 1]


def test_new_trials_are_numbered_as_ask_numbers_them(url: str) -> None:
    _created_together(url)


@pytest.mark.postgres
def test_new_trials_on_postgresql(pg_url: str) -> None:
    _created_together(pg_url)


def test_new_trials_leave_waiting_trials_to_ask(url: str) -> None:
    study_ = optuna.create_study(storage=storage.open_storage(url, must_exist=False))
    study_.enqueue_trial({"x": 0.5})
    assert storage.new_trials(study_, 2) is None
    asked = study_.ask()  # the queued trial, as Optuna asks it
    assert asked.number == 0 and asked.suggest_float("x", 0.0, 1.0) == 0.5
    assert len(study_.get_trials()) == 1


def test_a_transaction_whose_connection_drops_is_retried(pg_url: str) -> None:
    """A backend terminated mid-transaction (a restarted server, an administrator): a worker's
    write, inside `retrying`, goes through on a fresh connection; elsewhere it is one line."""
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    attempts: list[int] = []

    def write(drop: bool) -> None:
        with db.transaction(pg_url) as conn:
            attempts.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
            if drop and len(attempts) == 1:
                with admin.connect() as a:
                    a.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": attempts[0]})
            conn.execute(
                db.workers.insert().values(
                    study_name="s", host="h", pid=len(attempts), started_at=sa.func.now()
                )
            )

    storage.retrying(lambda: write(drop=True))
    assert len(attempts) == 2 and attempts[0] != attempts[1]
    rows = db.read_all(pg_url, sa.select(db.workers.c.pid))
    assert [r.pid for r in rows] == [2]  # the dropped attempt wrote nothing
    attempts.clear()
    with pytest.raises(ConnectionLost, match=r"^storage postgresql\S*/selector_test_\w+: ") as e:
        write(drop=True)
    assert storage.dropped(e.value) and "\n" not in str(e.value)
    admin.dispose()


def test_a_server_that_refuses_connections_is_not_retried() -> None:
    with pytest.raises(StorageError, match="cannot connect") as e:
        storage.open_storage("postgresql://postgres@127.0.0.1:1/none", must_exist=False)
    assert not isinstance(e.value, ConnectionLost) and not storage.dropped(e.value)
