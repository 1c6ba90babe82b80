"""Create, resume and run studies: the invariants of ARCHITECTURE.md asserted on real runs."""

from __future__ import annotations

import copy
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from sklearn.datasets import load_digits

from selector import data, diagnose, engine, objective, record, spec, stacked, study, worker
from selector import summary as summary_mod
from selector.errors import RefusedError, StudyError
from tests.conftest import PENGUINS, small_raw


def _spec(**overrides: Any) -> spec.StudySpec:
    return spec.parse(small_raw(**overrides), origin="t.toml")


def _trials(url: str, name: str = "iris-small") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_run_records_results_and_diagnosis(url: str) -> None:
    s = _spec()
    summary = study.run(s, url)
    assert summary.finished == 3 and summary.ran == 3
    t = _trials(url)[0]
    assert t.state == TrialState.COMPLETE
    for key in (
        "fold_scores",
        "train_fold_scores",
        "cv_std",
        "train_score",
        "gap",
        "best_epoch",
        "epochs_run",
        "seed",
        "fold_seeds",
        "worker",
        "n_params",
        "seconds",
    ):
        assert key in t.user_attrs, key
    # the config, the curves and the diagnosis are not user attrs
    for key in (
        "config",
        "diagnosis",
        "gradient_health",
        "grad_norms",
        "val_curve",
        "train_loss_curve",
        "fold_curves",
    ):
        assert key not in t.user_attrs, key
    # user attrs are rounded to 6 digits for display
    assert t.value == pytest.approx(np.mean(t.user_attrs["fold_scores"]), abs=1e-6)
    assert t.user_attrs["gap"] == pytest.approx(t.user_attrs["train_score"] - t.value, abs=2e-6)
    epochs = t.user_attrs["epochs_run"]
    assert list(t.intermediate_values) == list(range(1, epochs + 1))

    # the curves, packed in the trial's system attrs, read back through the record
    assert record.CURVES_ATTR in t.system_attrs
    r = record.TrialRecord.from_trial(t)
    assert r.curves is not None
    assert r.curves.folds.shape == (3, epochs) and r.curves.loss.shape == (epochs,)
    assert r.curves.grads.shape[0] == epochs and r.curves.grads.shape[1] >= 2
    assert np.isfinite(r.curves.grads).all() and (r.curves.loss > 0).all()
    # float32 storage; the per-epoch mean is what the pruner saw
    assert list(r.curves.val) == pytest.approx(
        [t.intermediate_values[e] for e in range(1, epochs + 1)], abs=1e-5
    )
    assert r.fold_scores == pytest.approx(
        [r.curves.folds[k, r.best_epoch - 1] for k in range(3)], abs=1e-5
    )

    # the config is rebuilt from the params through the search space
    config = r.config(s.space)
    assert {k: getattr(config, k) for k in t.params} == t.params

    # the diagnosis is computed when shown, against the study as it is now
    st = summary_mod.status(url, "iris-small")
    view = next(v for v in st.trials if v.record.number == t.number)
    assert view.diagnosis is not None and view.diagnosis.fit in diagnose.FITS
    assert view.diagnosis.gradients in ("healthy", "vanishing", "exploding")


def test_budget_is_for_the_whole_study_across_runs(url: str) -> None:
    s = _spec(n_trials=4)
    assert study.run(s, url, n_trials=1).finished == 1
    assert study.run(s, url, n_trials=2).finished == 3
    assert study.run(s, url).finished == 4
    with pytest.raises(RefusedError, match="already has 4 of its n_trials = 4"):
        study.run(s, url)
    assert study.run(_spec(n_trials=5), url).finished == 5  # raising n_trials extends the study


def test_changed_spec_is_refused_with_a_diff(url: str) -> None:
    study.create_or_resume(_spec(), url)
    changed = _spec(space={**small_raw()["space"], "lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    with pytest.raises(StudyError, match=r"space\.lr\.low: 0\.001 -> 0\.0001"):
        study.create_or_resume(changed, url)


def test_changed_data_is_refused(tmp_path: Path, url: str) -> None:
    csv = tmp_path / "p.csv"
    pd.read_csv(PENGUINS).to_csv(csv, index=False)
    raw = small_raw(name="peng", data={"path": str(csv), "target": "species"})
    raw["data"].pop("source")
    study.create_or_resume(spec.parse(raw, origin="p.toml"), url)
    df = pd.read_csv(csv)
    df.loc[5, "bill_length_mm"] = 99.0
    df.to_csv(csv, index=False)
    with pytest.raises(StudyError, match="the data differ"):
        study.create_or_resume(spec.parse(raw, origin="p.toml"), url)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[list[data.FoldData]]:
    seen: list[list[data.FoldData]] = []
    real = stacked.auto_cross_validate

    def spy(config: Any, folds: Any, **kw: Any) -> engine.CVResult:
        seen.append(list(folds))
        return real(config, folds, **kw)

    monkeypatch.setattr(objective.stacked, "auto_cross_validate", spy)
    return seen


def test_test_rows_never_reach_the_engine(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 1: poison the test rows with a canary value; no fold array may contain it."""
    raw = small_raw(name="canary")
    prep = data.prepare(spec.parse(raw, origin="t.toml"))
    frame = prep.table.X.copy()
    frame["target"] = prep.table.y
    frame.iloc[prep.test, 0] = 1e9  # the split depends on the rows and labels only, not on X
    csv = tmp_path / "canary.csv"
    frame.to_csv(csv, index=False)
    raw["data"] = {"path": str(csv), "target": "target", "test_size": 0.2}
    s = spec.parse(raw, origin="t.toml")
    assert np.array_equal(data.prepare(s).test, prep.test)
    monkeypatch.setattr(data, "test_set", lambda *_: pytest.fail("test rows read during search"))
    seen = _spy(monkeypatch)
    study.run(s, url)
    assert seen
    for folds in seen:
        assert sum(len(f.y_val) for f in folds) == len(prep.dev)
        for f in folds:  # scaled with training statistics, a 1e9 canary would be enormous
            assert np.abs(f.X_train).max() < 50 and np.abs(f.X_val).max() < 50


def test_every_trial_sees_the_same_folds(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 3, within a study and across runs."""
    seen = _spy(monkeypatch)
    s = _spec(n_trials=4)
    study.run(s, url, n_trials=2)
    study.run(s, url)

    def digest(folds: list[data.FoldData]) -> str:
        h = hashlib.sha256()
        for f in folds:
            for a in (f.X_train, f.y_train, f.X_val, f.y_val):
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    assert len(seen) == 4 and len({digest(f) for f in seen}) == 1


def test_a_failing_trial_is_recorded_and_the_study_goes_on(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 6: an exception ends one trial (reason and traceback kept), not the study."""
    real, calls = stacked.auto_cross_validate, []

    def flaky(*a: Any, **kw: Any) -> engine.CVResult:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in trial two")
        return real(*a, **kw)

    monkeypatch.setattr(objective.stacked, "auto_cross_validate", flaky)
    assert study.run(_spec(), url).finished == 3
    states = [t.state for t in _trials(url)]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3
    failed = next(t for t in _trials(url) if t.state == TrialState.FAIL)
    assert failed.user_attrs["fail_reason"] == "exception"
    assert "boom in trial two" in failed.user_attrs["error"]
    assert "Traceback" in failed.user_attrs["error"]


def test_a_streak_of_failures_stops_the_study_with_the_last_error(url: str) -> None:
    s = _spec(
        space={"optimizer": "sgd", "lr": 1e12, "width": 64, "depth": 3}, search={"max_failures": 3}
    )
    with pytest.raises(worker.FailureStreakError, match=r"3 consecutive failed trials.*diverged"):
        study.run(s, url)
    trials = _trials(url)
    assert len(trials) == 3
    assert all(t.user_attrs["fail_reason"] == "diverged" for t in trials)


def test_pruned_trials_count_towards_the_budget(url: str) -> None:
    s = _spec(
        n_trials=8,
        search={"pruner": "median", "sampler": "random"},
        training={"max_epochs": 12, "patience": 12},
        space={**small_raw()["space"], "lr": {"low": 1e-5, "high": 1e-1, "log": True}},
    )
    assert study.run(s, url).finished == 8
    trials = _trials(url)
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    for t in pruned:  # its scores up to the epoch it was pruned at are all recorded
        at = t.user_attrs["pruned_at_epoch"]
        assert at >= objective.MEDIAN_WARMUP
        assert list(t.intermediate_values) == list(range(1, at + 1))
        assert t.value == t.intermediate_values[at]


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_prune_decisions_equal_optunas_should_prune(tmp_path: Path, pruner: str) -> None:
    """`objective.prune_decisions` (a trial's scores partly written, partly pending; one read of
    the study) decides as Optuna's `Trial.should_prune` does with every score written: two
    copies of one study, each trial asked both ways (successive halving's rungs included)."""
    from selector import storage

    def make(where: str) -> optuna.Study:
        chosen = {
            "median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
            "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=12),
        }[pruner]
        return optuna.create_study(
            study_name="same",
            storage=storage.open_storage(f"sqlite:///{tmp_path / where}.db", must_exist=False),
            pruner=chosen,
            direction="maximize",
        )

    ours, theirs = make("ours"), make("theirs")
    rng = np.random.default_rng(0)
    for _ in range(8):
        values = rng.uniform(0.4, 0.9, 12)
        for st in (ours, theirs):
            t = st.ask()
            for step, value in enumerate(values, 1):
                t.report(float(value), step)
                t.should_prune()  # successive halving records its rungs as it goes
            st.tell(t, float(values[-1]))
    decided = []
    for trial_no in range(12):
        a, b = ours.ask(), theirs.ask()
        out = objective._Writer(a, prune_from=1)
        for step in range(1, 13):
            value = float((0.6 + 0.03 * trial_no) * rng.uniform(0.8, 1.0))
            out.scores.append((step, value))
            if step % 4 == 0:
                out.flush()  # some written, the rest pending
            b.report(value, step)
            decided.append((objective.prune_decisions(ours, [out])[0], b.should_prune()))
            if any(decided[-1]):
                break
        out.flush()
        ours.tell(a, state=TrialState.PRUNED)
        theirs.tell(b, state=TrialState.PRUNED)
    assert [m for m, _ in decided] == [t for _, t in decided]
    assert any(m for m, _ in decided) and not all(m for m, _ in decided)


def _alone(study_: optuna.Study, writers: list[objective._Writer]) -> list[bool]:
    """Each writer's trial decided alone by the study's pruner, with its scores so far."""
    decided = []
    for out in writers:
        now = copy.copy(out.trial._cached_frozen_trial)
        now.intermediate_values = dict(out.scores)
        decided.append(bool(study_.pruner.prune(study_, now)))
    return decided


def test_group_prune_decisions_equal_each_members_own(tmp_path: Path) -> None:
    """Members deciding together (one call, the median's list and each step's percentile
    shared) decide as each would alone through the pruner itself."""
    from selector import storage

    study_ = optuna.create_study(
        storage=storage.open_storage(f"sqlite:///{tmp_path / 's'}.db", must_exist=False),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        direction="maximize",
    )
    rng = np.random.default_rng(1)
    for _ in range(9):
        t = study_.ask()
        values = rng.uniform(0.4, 0.9, 6)
        for step, value in enumerate(values, 1):
            t.report(float(value), step)
        study_.tell(t, float(values.max()))
    writers = []
    for j in range(12):
        out = objective._Writer(study_.ask(), prune_from=1)
        for step in range(1, 4 + j % 3):  # members at steps 3, 4 and 5
            out.scores.append((step, float(rng.uniform(0.4, 0.9))))
        writers.append(out)
    together = objective.prune_decisions(study_, writers)
    assert together == _alone(study_, writers)
    assert any(together) and not all(together)


def test_group_prune_decisions_follow_the_complete_trials_as_they_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The median is memoised per count of complete trials (`record.Finished`): decisions made
    as trials complete between rounds, at the same steps, are each member's own decision. (The
    trials complete here by `tell`, as in another worker: read at once, not `record.FINISHED_READ_S` on.)"""
    from selector import storage

    monkeypatch.setattr(record, "FINISHED_READ_S", 0.0)

    study_ = optuna.create_study(
        storage=storage.open_storage(f"sqlite:///{tmp_path / 's'}.db", must_exist=False),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        direction="maximize",
    )
    rng = np.random.default_rng(2)

    def complete(low: float, high: float) -> None:
        t = study_.ask()
        values = rng.uniform(low, high, 6)
        for step, value in enumerate(values, 1):
            t.report(float(value), step)
        study_.tell(t, float(values.max()))

    for _ in range(3):
        complete(0.3, 0.6)
    rounds = []
    for low, high in [(0.9, 0.99)] * 5:
        writers = []
        for _ in range(6):
            out = objective._Writer(study_.ask(), prune_from=1)
            for step in range(1, 4):
                out.scores.append((step, float(rng.uniform(0.4, 0.8))))
            writers.append(out)
        together = objective.prune_decisions(study_, writers)
        assert together == _alone(study_, writers)
        rounds.append(sum(together))
        for out in writers:
            study_.tell(out.trial, state=TrialState.PRUNED)
        complete(low, high)  # the median at step 3 moves
    assert len(set(rounds)) > 1  # the median moved between rounds


def test_the_median_pruner_sees_other_workers_trials_within_its_read_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The median pruner's read of the study is reused for `record.FINISHED_READ_S`: a trial another
    worker completes meanwhile counts from the next read on; one this worker ends (its cache
    holds it as written) counts at once."""
    from selector import storage, worker

    monkeypatch.setattr(record, "FINISHED_READ_S", 0.5)
    url = f"sqlite:///{tmp_path / 's'}.db"
    mine = optuna.create_study(
        study_name="s",
        storage=storage.open_storage(url, must_exist=False),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        direction="maximize",
    )
    other = optuna.load_study(
        study_name="s", storage=storage.open_storage(url, must_exist=True), pruner=mine.pruner
    )

    # every trial asked first: an ask reads the study too
    first, last, theirs = mine.ask(), mine.ask(), other.ask()
    writers = [objective._Writer(mine.ask(), prune_from=1) for _ in range(4)]

    def decide(out: objective._Writer, score: float) -> bool:
        out.scores.append((1, score))
        return objective.prune_decisions(mine, [out])[0]

    first.report(0.5, 1)
    worker._tell(mine, first, 0.5, TrialState.COMPLETE)
    assert decide(writers[0], 0.6) is False  # above the median, 0.5
    theirs.report(0.9, 1)
    other.tell(theirs, 0.9)
    assert decide(writers[1], 0.6) is False  # read within the interval: the median is 0.5
    time.sleep(0.5)
    assert decide(writers[2], 0.6) is True  # read again: the median of 0.5 and 0.9 is 0.7
    last.report(0.95, 1)
    worker._tell(mine, last, 0.95, TrialState.COMPLETE)
    assert decide(writers[3], 0.85) is True  # this worker's own, at once: the median is 0.9


def test_a_new_trial_is_diagnosed_against_the_best_scores_every_view_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`record.study_best`: the best mean CV score and the best training score among the
    complete trials (not the best trial's own training score), as `diagnose.of_study` takes
    them for every view; another worker's trial counts from the next read on, this worker's at
    once; a storage without Optuna's cache (in memory) is read as it is."""
    from selector import storage, worker

    monkeypatch.setattr(record, "FINISHED_READ_S", 0.5)
    url = f"sqlite:///{tmp_path / 's'}.db"
    mine = optuna.create_study(
        study_name="s", storage=storage.open_storage(url, must_exist=False), direction="maximize"
    )
    other = optuna.load_study(study_name="s", storage=storage.open_storage(url, must_exist=True))
    in_memory = optuna.create_study(direction="maximize")
    assert record.study_best(mine) == (-math.inf, -math.inf)
    assert record.study_best(in_memory) == (-math.inf, -math.inf)

    def end(study: optuna.Study, value: float, train: list[float], theirs: bool = False) -> None:
        t = study.ask()
        t.set_user_attr("fold_scores", [value, value])
        t.set_user_attr("train_fold_scores", train)
        if theirs:
            study.tell(t, value)
        else:
            worker._tell(study, t, value, TrialState.COMPLETE)

    for study_ in (mine, in_memory):
        end(study_, 0.9, [0.95, 0.97])  # the best score
        end(study_, 0.8, [0.99, 1.0])  # the best training score
        pruned = study_.ask()
        pruned.set_user_attr("train_fold_scores", [1.0, 1.0])  # not complete: not counted
        worker._tell(study_, pruned, None, TrialState.PRUNED)
        unscored = study_.ask()  # complete without its scores recorded: not counted either
        unscored.set_user_attr("train_fold_scores", [1.0, 1.0])
        worker._tell(study_, unscored, 0.99, TrialState.COMPLETE)
        assert record.study_best(study_) == (0.9, pytest.approx(0.995))
        ctx = diagnose.context(
            record.trials(study_), metric="accuracy", baseline=None, max_epochs=10
        )
        assert record.study_best(study_) == (ctx.best_val, ctx.best_train)
    end(other, 0.95, [0.9, 0.9], theirs=True)
    assert record.study_best(mine)[0] == 0.9  # read within the interval
    time.sleep(0.5)
    assert record.study_best(mine) == (0.95, pytest.approx(0.995))  # read again
    end(mine, 0.97, [0.96, 0.96])
    assert record.study_best(mine)[0] == 0.97  # this worker's own, at once


def test_same_file_and_seed_give_identical_trials(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        u = f"sqlite:///{tmp_path / f'r{i}.db'}"
        study.run(_spec(search={"sampler": "tpe", "pruner": "none"}), u)
        runs.append([(t.params, t.value) for t in _trials(u)])
    assert runs[0] == runs[1]


def test_leak_detector_shuffled_labels_stay_at_chance(tmp_path: Path, url: str) -> None:
    """With labels shuffled, nothing can be learned: a CV score well above chance means a leak."""
    X, y = load_digits(return_X_y=True, as_frame=True)
    frame = X.assign(target=np.random.default_rng(0).permutation(y.to_numpy()))
    csv = tmp_path / "shuffled.csv"
    frame.to_csv(csv, index=False)
    raw = small_raw(
        name="leak",
        n_trials=3,
        data={"path": str(csv), "target": "target"},
        training={"max_epochs": 8, "patience": 8},
        space={"width": 128, "depth": 2, "lr": 0.003, "batch_size": 64},
    )
    raw["data"].pop("source")
    s = spec.parse(raw, origin="leak.toml")
    assert study.run(s, url).best_value < 0.2  # type: ignore[operator]


def test_out_of_memory_is_recorded_as_oom(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def oom(*_: Any, **__: Any) -> engine.CVResult:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(objective.stacked, "auto_cross_validate", oom)
    with pytest.raises(worker.FailureStreakError, match="oom: CUDA out of memory"):
        study.run(_spec(search={"max_failures": 2}), url)
    assert {t.user_attrs["fail_reason"] for t in _trials(url)} == {"oom"}


def test_an_error_in_one_of_several_workers_is_reported(tmp_path: Path) -> None:
    from selector import launch

    url = f"sqlite:///{tmp_path / 's.db'}"
    s = _spec(
        space={"optimizer": "sgd", "lr": 1e12, "width": 64, "depth": 3},
        search={"max_failures": 2},
        training={"max_epochs": 3, "patience": 3, "device": "cpu"},
    )
    with pytest.raises(
        launch.WorkerError, match="consecutive failed trials; last error: diverged"
    ) as e:
        launch.run(s, url, workers=2, threads=1)
    assert e.value.exit_code == 1


def test_replay_reproduces_complete_and_pruned_trials(url: str) -> None:
    from selector import replay

    s = _spec(
        n_trials=8,
        search={"pruner": "median", "sampler": "random"},
        training={"max_epochs": 10, "patience": 10, "device": "cpu"},
        space={
            **small_raw()["space"],
            "dropout": {"low": 0.0, "high": 0.3},
            "lr": {"low": 1e-5, "high": 1e-1, "log": True},
        },
    )
    study.run(s, url)
    for t in _trials(url):
        r = replay.replay(url, "iris-small", t.number)
        assert r.identical, r
        assert "config_identical" not in r.as_dict()
