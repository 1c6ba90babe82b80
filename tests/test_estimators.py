"""The scikit-learn estimators: a study per fit on the given rows, the refit on all of them, and
scikit-learn's contracts (clone, params, pickling, Pipeline, cross_val_score, its own checks)."""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_iris
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import selector
from selector import api
from selector.errors import RefusedError
from selector.estimators import MLPSearchClassifier, MLPSearchRegressor
from tests.conftest import PENGUINS

# A search that finishes in about a second: 2 trials of 3 folds, 5 epochs, tiny networks.
TINY: dict[str, Any] = {
    "space": {
        "depth": 1,
        "width": [8, 16],
        "lr": {"low": 1e-2, "high": 5e-2, "log": True},
        "batch_size": 32,
    },
    "folds": 3,
    "n_trials": 2,
    "max_epochs": 5,
    "patience": 3,
    "sampler": "random",
    "pruner": "none",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def penguins() -> tuple[pd.DataFrame, pd.Series]:
    """344 rows; two categorical columns (island as a pandas category, sex as strings), missing
    values in five columns."""
    frame = pd.read_csv(PENGUINS).astype({"island": "category"})
    return frame.drop(columns=["species"]), frame["species"]


@pytest.fixture(scope="module")
def fitted(penguins: tuple[pd.DataFrame, pd.Series]) -> MLPSearchClassifier:
    X, y = penguins
    return MLPSearchClassifier(**TINY).fit(X, y)


def test_init_only_stores_the_settings_which_clone_and_set_params_keep() -> None:
    est = MLPSearchClassifier(**TINY, seed=3)
    assert est.get_params()["seed"] == 3 and est.get_params()["space"] == TINY["space"]
    assert not [k for k in vars(est) if k.endswith("_")]  # nothing fitted yet
    twin = clone(est).set_params(n_trials=5)
    assert twin.n_trials == 5 and est.n_trials == 2
    assert {k: v for k, v in twin.get_params().items() if k != "n_trials"} == {
        k: v for k, v in est.get_params().items() if k != "n_trials"
    }


def test_fit_on_a_frame_with_categories_and_missing_values(
    fitted: MLPSearchClassifier, penguins: tuple[pd.DataFrame, pd.Series]
) -> None:
    X, y = penguins
    assert X.isna().any().sum() == 5 and X.select_dtypes(exclude="number").shape[1] == 2
    assert list(fitted.classes_) == ["Adelie", "Chinstrap", "Gentoo"]
    assert list(fitted.feature_names_in_) == list(X.columns) and fitted.n_features_in_ == 7
    assert fitted.study_["storage"] is None  # a temporary database, removed after the fit
    proba = fitted.predict_proba(X)
    assert proba.shape == (len(X), 3) and np.allclose(proba.sum(axis=1), 1.0)
    labels = fitted.predict(X)
    assert set(labels) <= set(fitted.classes_)
    assert (labels == fitted.classes_[proba.argmax(axis=1)]).all()
    majority = y.value_counts(normalize=True).max()
    assert fitted.score(X, y) > majority + 0.2  # learnt from the rows, categories included


def test_cv_results_follow_scikit_learns_layout(fitted: MLPSearchClassifier) -> None:
    res = fitted.cv_results_
    n = TINY["n_trials"]
    for key in (
        "params",
        "mean_test_score",
        "std_test_score",
        "rank_test_score",
        "mean_train_score",
        "split0_test_score",
        "split2_test_score",
        "split1_train_score",
        "param_width",
    ):
        assert len(res[key]) == n, key
    assert "split3_test_score" not in res
    best = fitted.best_index_
    assert res["rank_test_score"][best] == 1
    assert fitted.best_score_ == res["mean_test_score"][best] == max(res["mean_test_score"])
    assert fitted.best_params_ == res["params"][best]
    splits = np.array([res[f"split{k}_test_score"] for k in range(3)])
    assert np.allclose(splits.mean(axis=0), res["mean_test_score"], atol=1e-5)
    assert np.allclose(splits.std(axis=0), res["std_test_score"])
    assert fitted.best_config_["width"] == fitted.best_params_["width"]
    assert 1 <= fitted.best_epoch_ <= TINY["max_epochs"]
    assert len(pd.DataFrame(res)) == n


def test_a_fitted_estimator_pickles_as_weights_and_statistics(
    fitted: MLPSearchClassifier, penguins: tuple[pd.DataFrame, pd.Series]
) -> None:
    X, _ = penguins
    blob = pickle.dumps(fitted)
    assert (
        b"sqlalchemy" not in blob and b"torch" not in blob
    )  # no connection; numpy weights, not tensors
    back = pickle.loads(blob)
    assert np.array_equal(back.predict_proba(X), fitted.predict_proba(X))


def test_the_regressor_fits_arrays_and_predicts_on_the_targets_scale() -> None:
    X, y = load_diabetes(return_X_y=True)
    est = MLPSearchRegressor(**TINY).fit(X, y)
    assert not hasattr(est, "feature_names_in_") and est.n_features_in_ == 10
    pred = est.predict(X)
    assert pred.shape == y.shape
    assert abs(pred.mean() - y.mean()) < 0.2 * y.std()  # the standardised target undone
    assert est.score(X, y) > 0.2
    assert np.isfinite(est.cv_results_["mean_test_score"]).all()


def test_pipeline_and_cross_val_score() -> None:
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), MLPSearchClassifier(**TINY))
    scores = cross_val_score(pipe, X, y, cv=2, error_score="raise")
    assert scores.shape == (2,) and (scores > 0.6).all()


def test_fit_leaves_no_files_and_no_open_connections(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    X, y = load_iris(return_X_y=True)
    est = MLPSearchClassifier(**TINY)
    est.fit(X, y)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        est.fit(X, y)
    assert len(os.listdir("/proc/self/fd")) <= before
    assert list(tmp_path.iterdir()) == []


def test_a_given_storage_keeps_the_study_which_final_refuses(url: str) -> None:
    X, y = load_iris(return_X_y=True, as_frame=True)
    est = MLPSearchClassifier(**TINY, storage=url).fit(X, y)
    study = selector.Study(est.study_["name"], storage=url)
    status = study.status()
    assert status.finished == TINY["n_trials"] and status.test_rows == 0
    assert status.dev_rows == len(X)
    assert study.trials_frame()["value"].max() == est.best_score_
    with pytest.raises(RefusedError, match="holds back no test set"):
        study.final(progress=False)


def test_bad_settings_and_rows_are_value_errors() -> None:
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ValueError, match=r"space\.depht: unknown key \(did you mean 'depth'\?\)"):
        MLPSearchClassifier(**{**TINY, "space": {"depht": 2}}).fit(X, y)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        MLPSearchClassifier(**TINY, workers=0).fit(X, y)
    with pytest.raises(ValueError, match="n_samples = 5: too few rows for 3-fold"):
        MLPSearchClassifier(**TINY).fit(X[::30], y[::30])  # 5 rows of 3 classes
    with pytest.raises(ValueError, match=r"y has 1 class \(0\); a classifier needs at least 2"):
        MLPSearchClassifier(**TINY).fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPSearchClassifier(**TINY).fit(X, X[:, 0])


# Rows and settings a fit refuses, and what its ValueError must say. The messages speak of X, y
# and the estimator's parameters: never the fit's temporary file, the study's column names, or a
# study file's settings.
RNG = np.random.default_rng(0)
ROWS = RNG.normal(size=(40, 3))
PAIRS = np.array(["cat", "dog"] * 20)
REFUSED = [
    pytest.param(
        MLPSearchClassifier,
        {},
        ROWS,
        np.array(["cat"] * 20 + ["dog"] * 19 + ["eel"]),
        ["y: class 'eel' has 1 row, fewer than folds = 3", "lower folds"],
        id="rare-class",
    ),
    pytest.param(
        MLPSearchClassifier,
        {},
        np.c_[ROWS, np.full(40, np.nan)],
        PAIRS,
        ["X: column 'x3' has no values", "drop column 'x3' from X"],
        id="empty-column",
    ),
    pytest.param(
        MLPSearchClassifier,
        {},
        np.c_[ROWS, np.full(40, 1e39)],
        PAIRS,
        ["X: column 'x3' has values beyond", "drop column 'x3' from X"],
        id="huge-column",
    ),
    pytest.param(
        MLPSearchClassifier,
        {},
        pd.DataFrame({"a": ROWS[:, 0], "n": ["1"] * 39 + ["x"]}),
        PAIRS,
        ["X: column 'n' is numeric but holds text such as 'x'", "drop column 'n' from X"],
        id="text-in-numbers",
    ),
    pytest.param(
        MLPSearchClassifier,
        {},
        pd.DataFrame({"a": ROWS[:, 0], "n": [1.0] * 39 + [np.inf]}),
        PAIRS,
        ["X: column 'n' has infinite values", "drop column 'n' from X"],
        id="inf-in-frame",
    ),
    pytest.param(
        MLPSearchRegressor,
        {},
        ROWS,
        np.ones(40),
        ["y is constant (1.0)"],
        id="constant-y",
    ),
    pytest.param(
        MLPSearchRegressor,
        {},
        ROWS,
        np.r_[np.zeros(39), 1e39],
        ["y has values beyond"],
        id="huge-y",
    ),
    pytest.param(
        MLPSearchClassifier,
        {"metric": "r2"},
        ROWS,
        PAIRS,
        ["metric 'r2' scores regression", "use one of accuracy"],
        id="metric-of-other-task",
    ),
    pytest.param(
        MLPSearchClassifier,
        {"metric": "f1"},
        ROWS,
        np.array(["a", "b", "c", "d"] * 10),
        ["metric 'f1' needs 2 classes", "f1_macro"],
        id="f1-of-four-classes",
    ),
    pytest.param(
        MLPSearchClassifier,
        {"folds": 1},
        ROWS,
        PAIRS,
        ["MLPSearchClassifier: folds: ", "greater than or equal to 2"],
        id="one-fold",
    ),
    pytest.param(
        MLPSearchClassifier,
        {"max_epochs": 0},
        ROWS,
        PAIRS,
        ["MLPSearchClassifier: max_epochs: "],
        id="no-epochs",
    ),
    pytest.param(
        MLPSearchRegressor,
        {"sampler": "grid"},
        ROWS,
        RNG.normal(size=40),
        ["MLPSearchRegressor: sampler: ", "'tpe'"],
        id="unknown-sampler",
    ),
    pytest.param(
        MLPSearchClassifier,
        {"device": "tpu"},
        ROWS,
        PAIRS,
        ["MLPSearchClassifier: device: "],
        id="unknown-device",
    ),
]


@pytest.mark.parametrize(("cls", "settings", "X", "y", "says"), REFUSED)
def test_refused_rows_and_settings_are_named_as_the_estimator_takes_them(
    cls: type, settings: dict[str, Any], X: Any, y: Any, says: list[str]
) -> None:
    with pytest.raises(ValueError) as refused:
        cls(**{**TINY, **settings}).fit(X, y)
    message = str(refused.value)
    for part in says:
        assert part in message
    for study_term in ("selector-fit-", ".parquet", "'target'", "cv.", "data.", "training."):
        assert study_term not in message


def test_a_fit_runs_where_torch_was_set_to_more_threads_than_a_worker_may_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fit's one worker takes the caller's torch threads, capped at what `run` accepts (a
    caller's torch set past that must not make `fit` refuse a parameter it does not have)."""
    import torch

    threads = (
        torch.get_num_threads()
    )  # what the run's restore would otherwise leave at 4 x cores + 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: api.max_threads() + 1)
    seen: list[int | None] = []
    run = api.run

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("threads"))
        return run(*args, **kwargs)

    monkeypatch.setattr(api, "run", recording)
    X, y = load_iris(return_X_y=True)
    try:
        MLPSearchClassifier(**{**TINY, "n_trials": 1}).fit(X, y)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    assert seen == [api.max_threads()]


def test_a_fit_leaves_optunas_log_quiet() -> None:
    """No "A new study created" line a fit, at Optuna's default verbosity (INFO; the suite's
    fixture sets ERROR): a handler of the test's own sees what Optuna's would print."""
    optuna.logging.set_verbosity(optuna.logging.INFO)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    log = logging.getLogger("optuna")
    log.addHandler(handler)
    try:
        X, y = load_iris(return_X_y=True)
        MLPSearchClassifier(**{**TINY, "n_trials": 1}).fit(X, y)
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == []


# scikit-learn's own checks, on a budget of one trial of two folds.
CHECKED: dict[str, Any] = {
    **TINY,
    "space": {"depth": 1, "width": 16, "lr": 0.03, "batch_size": 16},
    "folds": 2,
    "n_trials": 1,
    "max_epochs": 10,
    "patience": 10,
}
# These checks fit a classifier on 20 rows whose random labels leave a class with one row: no
# K-fold split can put it in every fold's training rows, and `fit` refuses such rows with a
# ValueError (as a study does). The regressor passes the same checks, on the code they share.
RARE_CLASS = (
    "its data leave a class with one row, which cross-validation cannot stratify into 2 folds: "
    "fit refuses it with a ValueError"
)
CLASSIFIER_FAILS = {
    check: RARE_CLASS
    for check in (
        "check_dict_unchanged",
        "check_dont_overwrite_parameters",
        "check_f_contiguous_array_estimator",
        "check_fit2d_predict1d",
        "check_methods_sample_order_invariance",
        "check_methods_subset_invariance",
    )
}


def _expected_failures(estimator: Any) -> dict[str, str]:
    return CLASSIFIER_FAILS if isinstance(estimator, MLPSearchClassifier) else {}


@parametrize_with_checks(
    [MLPSearchClassifier(**CHECKED), MLPSearchRegressor(**CHECKED)],
    expected_failed_checks=_expected_failures,
)
def test_scikit_learn_checks(estimator: Any, check: Any) -> None:
    check(estimator)


def test_predictions_do_not_depend_on_row_order_or_batches(
    fitted: MLPSearchClassifier, penguins: tuple[pd.DataFrame, pd.Series]
) -> None:
    """What the classifier's order and subset checks would test, on rows it can fit."""
    X, _ = penguins
    proba = fitted.predict_proba(X)
    order = np.random.default_rng(0).permutation(len(X))
    assert np.allclose(fitted.predict_proba(X.iloc[order]), proba[order], atol=1e-7)
    halves = np.vstack([fitted.predict_proba(X.iloc[:100]), fitted.predict_proba(X.iloc[100:])])
    assert np.allclose(halves, proba, atol=1e-7)


@pytest.mark.slow
def test_several_workers_search_on_the_same_rows(
    penguins: tuple[pd.DataFrame, pd.Series], url: str
) -> None:
    """Worker processes (the parent only watches) read the rows from the fit's Parquet file, as
    from a study file's data."""
    X, y = penguins
    est = MLPSearchClassifier(**{**TINY, "n_trials": 4}, workers=2, storage=url).fit(X, y)
    assert list(est.cv_results_["state"]) == ["complete"] * 4
    records = selector.Study(est.study_["name"], storage=url).trials()
    assert all(r.complete and r.worker is not None for r in records)  # run by the workers
    assert est.score(X, y) > y.value_counts(normalize=True).max()
