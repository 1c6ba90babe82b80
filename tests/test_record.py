"""The typed trial record: what the objective writes is what every view reads back, small."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from selector import record, spec, storage, study, summary
from selector.errors import StudyError
from selector.record import Curves, TrialRecord
from tests.conftest import small_raw


@pytest.fixture
def ran(url: str) -> str:
    study.run(spec.parse(small_raw(n_trials=3), origin="t.toml"), url)
    return url


def test_curves_pack_and_unpack_as_float32() -> None:
    rng = np.random.default_rng(0)
    c = Curves(rng.random((5, 7)), rng.random(7), rng.random((7, 3)))
    back = Curves.decode(json.loads(json.dumps(c.encode())))
    for a, b in ((c.folds, back.folds), (c.loss, back.loss), (c.grads, back.grads)):
        assert np.array_equal(a.astype(np.float32), b)
    assert np.allclose(back.val, c.folds.mean(axis=0), atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "pred"),
    [
        ("labels", np.array([0, 3, 2, 1])),
        ("proba", np.array([[0.25, 0.75], [0.5, 0.5]])),
        ("values", np.array([1.5, -2.25, 1e6])),
    ],
)
def test_out_of_fold_predictions_round_trip(kind: str, pred: np.ndarray) -> None:
    back = record.unpack_oof(record.pack_oof(pred, kind))
    assert back.shape == pred.shape and np.allclose(back, pred, rtol=1e-3)


def test_the_objective_writes_what_from_trial_reads(ran: str) -> None:
    s, rec = record.open_study(ran, "iris-small")
    for t in s.get_trials(states=(TrialState.COMPLETE,)):
        r = TrialRecord.from_trial(t)
        assert r.complete and r.value == pytest.approx(np.mean(r.fold_scores), abs=1e-6)
        assert len(r.fold_scores) == len(r.train_fold_scores) == 3
        assert r.curves is not None and r.curves.folds.shape == (3, r.epochs_run)
        assert r.curves.grads.shape[0] == r.epochs_run
        assert np.allclose(
            r.curves.val, [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        )
        assert r.config(rec.spec.space).depth == t.params["depth"]
        assert {k: v for k, v in r.to_user_attrs().items() if k != "seconds"} == {
            k: v for k, v in t.user_attrs.items() if k in r.to_user_attrs() and k != "seconds"
        }


def test_read_trials_reads_what_optuna_reads(ran: str) -> None:
    s, _ = record.open_study(ran, "iris-small")
    attrs, fast = record.read_trials(ran, "iris-small")
    assert attrs == s.user_attrs
    assert fast == record.trials(s)


@pytest.mark.postgres
def test_read_trials_reads_what_optuna_reads_on_postgresql(pg_url: str) -> None:
    study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), pg_url)
    s, _ = record.open_study(pg_url, "iris-small")
    attrs, fast = record.read_trials(pg_url, "iris-small")
    assert attrs == s.user_attrs and fast == record.trials(s)
    assert record.silent_trials(pg_url, "iris-small") == []


def _mixed_storage(url: str) -> None:
    """A selector study and Optuna studies of every kind a shared storage may hold: minimizing,
    two objectives, no complete trial, an infinite best, pruned and failed trials."""
    study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), url)
    store = storage.open_storage(url, must_exist=True)
    low = optuna.create_study(study_name="minimizing", storage=store, direction="minimize")
    for x in (3.0, -1.5, 2.0):
        low.add_trial(optuna.trial.create_trial(value=x))
    low.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    two = optuna.create_study(study_name="two", storage=store, directions=["maximize", "minimize"])
    two.add_trial(optuna.trial.create_trial(values=[1.0, 2.0]))
    none = optuna.create_study(study_name="pruned-only", storage=store)
    none.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.5}))
    inf = optuna.create_study(study_name="infinite", storage=store, direction="maximize")
    for x in (1.0, math.inf):
        inf.add_trial(optuna.trial.create_trial(value=x))
    optuna.create_study(study_name="empty", storage=store)


def _optunas_overviews(url: str) -> list[record.StudyOverview]:
    store = storage.open_storage(url, must_exist=True)
    return [
        record.StudyOverview(s.study_name, s.n_trials, s.best_trial.value if s.best_trial else None)
        for s in optuna.get_all_study_summaries(store, include_best_trial=True)
    ]


def test_study_overviews_read_what_optunas_summaries_read(url: str) -> None:
    """Counts and best values from a few queries, equal to Optuna's summaries (which load
    every trial of every study: `selector studies` took 6 s at 4,800 trials)."""
    _mixed_storage(url)
    fast = record.study_overviews(url)
    assert fast == _optunas_overviews(url)
    assert [o.name for o in fast] == [
        "iris-small",
        "minimizing",
        "two",
        "pruned-only",
        "infinite",
        "empty",
    ]
    assert {o.name: o.best for o in fast}["minimizing"] == -1.5


def test_listing_studies_never_reads_their_trials(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`studies`, creating a study beside others and naming the studies of a missing one go
    without Optuna's summaries: creating a study beside one of 4,800 trials took 10 s."""
    _mixed_storage(url)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("every trial of every study read")

    monkeypatch.setattr(optuna, "get_all_study_summaries", refused)
    monkeypatch.setattr(optuna.study, "get_all_study_summaries", refused)
    assert [r["study"] for r in summary.studies(url)][:2] == ["iris-small", "minimizing"]
    study.create_or_resume(spec.parse(small_raw(name="beside"), origin="t.toml"), url)
    with pytest.raises(StudyError, match=r"no study 'nope'.*studies here: iris-small, minimizing"):
        record.open_study(url, "nope")


def _optunas_counts(url: str, name: str) -> Counter[TrialState]:
    s = optuna.load_study(study_name=name, storage=storage.open_storage(url, must_exist=True))
    return Counter(t.state for t in s.get_trials(deepcopy=False))


def test_state_counts_count_what_optuna_reads(url: str) -> None:
    _mixed_storage(url)
    for name in ("iris-small", "minimizing", "pruned-only", "empty"):
        assert record.state_counts(url, name) == _optunas_counts(url, name), name
    assert record.state_counts(url, "minimizing") == {TrialState.COMPLETE: 3, TrialState.FAIL: 1}


@pytest.mark.postgres
def test_study_overviews_on_postgresql(pg_url: str) -> None:
    _mixed_storage(pg_url)
    assert record.study_overviews(pg_url) == _optunas_overviews(pg_url)
    assert record.state_counts(pg_url, "minimizing") == _optunas_counts(pg_url, "minimizing")


def test_user_attrs_stay_small(ran: str) -> None:
    s, _ = record.open_study(ran, "iris-small")
    for t in s.get_trials():
        assert len(json.dumps(t.user_attrs)) < 700, t.user_attrs
        assert not {"config", "diagnosis", "fold_curves", "grad_norms"} & set(t.user_attrs)


def test_the_dev_targets_and_folds_are_recorded_beside_the_predictions(ran: str) -> None:
    s, _ = record.open_study(ran, "iris-small")
    numbers = [t.number for t in s.get_trials(states=(TrialState.COMPLETE,))]
    stored = record.read_oof(ran, "iris-small", [record.TARGET_ROW, record.FOLDS_ROW, *numbers])
    y, folds = stored.pop(record.TARGET_ROW), stored.pop(record.FOLDS_ROW)
    assert len(y) == len(folds) == 120 and set(folds.tolist()) == {0, 1, 2}
    assert set(stored) == set(numbers)
    for pred in stored.values():
        assert pred.shape == y.shape  # accuracy scores labels: one label per dev row
        assert set(np.unique(pred)) <= {0, 1, 2}


def test_a_trial_without_scores_is_not_complete() -> None:
    r = TrialRecord(number=0, state=TrialState.COMPLETE, value=0.5)
    assert not r.complete and r.to_user_attrs() == {}
    assert r.state == TrialState.COMPLETE


def test_finished_trials_index_follows_optunas_lists(url: str) -> None:
    """`record.finished_trials` holds the complete trials (by number) and the finished ones (by
    completion) that `get_trials` lists, as trials finish out of order, fail, are pruned, and
    finish in another process's handle on the study (read at the next `one_read`)."""
    import math

    import optuna
    from optuna.pruners import _percentile
    from optuna.study import StudyDirection

    from selector import storage

    mine = optuna.create_study(
        study_name="s", storage=storage.open_storage(url, must_exist=False), direction="maximize"
    )
    other = optuna.load_study(study_name="s", storage=storage.open_storage(url, must_exist=True))
    rng = np.random.default_rng(0)
    running: list[tuple[optuna.Study, optuna.Trial]] = []
    for i in range(40):
        handle = mine if i % 3 else other
        running.append((handle, handle.ask()))
        if rng.uniform() < 0.6 and running:  # one of the running trials ends, any of them
            st, t = running.pop(int(rng.integers(len(running))))
            ending = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL][int(rng.integers(3))]
            if ending != TrialState.FAIL:
                for step in range(1, int(rng.integers(1, 4)) + 1):
                    t.report(float(rng.uniform()) if rng.uniform() < 0.9 else math.nan, step)
            st.tell(
                t, float(rng.uniform()) if ending == TrialState.COMPLETE else None, state=ending
            )
        with record.one_read(mine, running=False):
            index = record.finished_trials(mine)
            listed = mine.get_trials(deepcopy=False, states=record.FINISHED)
        assert index is not None
        complete = [t.number for t in listed if t.state == TrialState.COMPLETE]
        assert [t.number for t in index.complete] == complete
        assert index.ended == sorted((t.datetime_complete, t.number) for t in listed)
        assert index.low <= min((t.number for _, t in running), default=index.low)
        for step in (1, 2, 3):
            for direction in StudyDirection:
                for n_min in (1, 4):
                    ours = index.percentile(direction, step, 50.0, n_min)
                    theirs = (
                        _percentile._get_percentile_intermediate_result_over_trials(
                            index.complete, direction, step, 50.0, n_min
                        )
                        if index.complete
                        else math.nan
                    )
                    assert ours == theirs or (math.isnan(ours) and math.isnan(theirs))
    assert len(index.complete) > 5 and index.seen  # out of order: some held above `low`
