"""Diagnoses computed against the study as it is now: each label on constructed cases, and the
gradient labels on networks that really vanish and explode."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.trial import TrialState

from selector import diagnose, objective
from selector.diagnose import Context
from selector.record import Curves, TrialRecord
from selector.space import TrialConfig
from tests.conftest import bundled_folds


def _record(
    number: int,
    val: list[float],
    train: list[float],
    *,
    best_epoch: int = 5,
    grads: list[list[float]] | None = None,
) -> TrialRecord:
    g = np.asarray(grads if grads is not None else [[1.0, 1.0]] * 3, dtype=float)
    return TrialRecord(
        number=number,
        state=TrialState.COMPLETE,
        value=float(np.mean(val)),
        fold_scores=tuple(val),
        train_fold_scores=tuple(train),
        best_epoch=best_epoch,
        epochs_run=best_epoch,
        curves=Curves(np.zeros((len(val), 3)), np.zeros(3), g),
    )


def _ctx(**kw: object) -> Context:
    base: dict[str, object] = {
        "metric": "accuracy",
        "best_val": 0.97,
        "best_train": 0.99,
        "baseline": 0.40,
        "max_epochs": 60,
    }
    return Context(**{**base, **kw})  # type: ignore[arg-type]


def _fit(val: list[float], train: list[float], ctx: Context) -> str:
    r = _record(0, val, train)
    return diagnose.fit_label(
        val=float(r.value), train=r.train_score, fold_gaps=r.fold_gaps, ctx=ctx
    )  # type: ignore[arg-type]


def test_a_trial_below_the_majority_class_is_not_learning_whatever_its_fold_spread() -> None:
    # the 4-fold binary study: 0.47 accuracy with folds so spread that the old tolerance was 0.30
    ctx = _ctx(baseline=0.53, best_val=0.95, best_train=0.97)
    assert _fit([0.20, 0.75, 0.30, 0.63], [0.45, 0.60, 0.52, 0.55], ctx) == "not learning"


def test_a_regression_trial_worse_than_the_target_mean_is_not_learning() -> None:
    # RMSE 187 against a target standard deviation of 164 (neg RMSE: greater is better)
    ctx = _ctx(
        metric="neg_root_mean_squared_error", baseline=-164.0, best_val=-38.0, best_train=-30.0
    )
    assert _fit([-187.0] * 5, [-180.0] * 5, ctx) == "not learning"


def test_two_trials_of_the_same_score_get_the_same_label_whatever_ran_first() -> None:
    # trial 2 (RMSE 38) and trial 19 (RMSE 40) are judged against the same study, now
    ctx_kw = {"metric": "neg_root_mean_squared_error", "baseline": -164.0}
    t2 = _record(2, [-38.0] * 5, [-33.0] * 5)
    t19 = _record(19, [-40.0] * 5, [-35.0] * 5)
    first = _record(0, [-187.0] * 5, [-180.0] * 5)
    labels = diagnose.of_study([first, t2, t19], max_epochs=60, **ctx_kw)  # type: ignore[arg-type]
    assert labels[0].fit == "not learning"
    assert labels[2].fit == labels[19].fit == "overfit"  # gaps of 5 > margin 3.28


def test_a_large_gap_is_overfit() -> None:
    assert _fit([0.90, 0.91, 0.89], [1.0, 1.0, 1.0], _ctx()) == "overfit"


def test_a_network_that_cannot_fit_its_training_rows_is_underfit() -> None:
    assert _fit([0.80, 0.81, 0.79], [0.81, 0.82, 0.80], _ctx()) == "underfit"


def test_near_best_trials_on_easy_data_are_a_good_fit() -> None:
    # penguins: the best trials score 1.0 in CV with a training score of 0.993
    assert _fit([1.0, 1.0, 1.0], [0.993, 0.992, 0.994], _ctx(best_val=1.0, best_train=1.0)) == (
        "good fit"
    )


def test_folds_that_disagree_too_much_say_so() -> None:
    # per-fold gaps of +0.35 and -0.3: no label can be told, and the label says so
    got = _fit(
        [0.60, 0.95, 0.62, 0.96], [0.95, 0.65, 0.97, 0.64], _ctx(best_val=0.8, best_train=0.8)
    )
    assert got == "too noisy to tell"


def test_the_best_epoch_at_the_last_epoch_allowed_is_stopped_while_improving() -> None:
    r = _record(0, [0.95] * 3, [0.96] * 3, best_epoch=60)
    d = diagnose.diagnose(r, _ctx())
    assert d.still_improving and d.label == "good fit, stopped while improving"
    assert not diagnose.diagnose(
        _record(0, [0.95] * 3, [0.96] * 3, best_epoch=59), _ctx()
    ).still_improving


def test_labels_follow_the_study_as_it_is_now() -> None:
    early = _record(0, [0.80] * 3, [0.82] * 3)
    alone = diagnose.of_study([early], metric="accuracy", baseline=0.4, max_epochs=60)
    assert alone[0].fit == "good fit"  # the best so far
    better = _record(1, [0.97] * 3, [0.99] * 3)
    later = diagnose.of_study([early, better], metric="accuracy", baseline=0.4, max_epochs=60)
    assert later[0].fit == "underfit"  # the same trial, once a better one exists


@pytest.mark.parametrize(
    ("norms", "label"),
    [
        ([[0.1, 0.2, 0.3]] * 4, "healthy"),
        ([[1e-4, 1e-2, 0.1]] * 4, "vanishing"),
        ([[0.1, 0.2, 0.3], [50.0, 20.0, 30.0]], "exploding"),
        ([[0.1, 0.2, 0.3], [float("nan"), 0.2, 0.3]], "exploding"),
        ([[1e-4, 0.01, 0.8], [0.02, 0.02, 0.3], [0.02, 0.02, 0.3]], "healthy"),  # it recovered
    ],
)
def test_gradient_health(norms: list[list[float]], label: str) -> None:
    assert diagnose.gradient_health(norms) == label


def test_trivial_scores_are_the_majority_class_and_the_mean() -> None:
    from selector import metrics

    y_train, y_val = np.array([0, 0, 1]), np.array([0, 1, 1, 1])
    acc = metrics.get("accuracy").of_predictions
    assert diagnose.trivial_scores(
        [(y_train, y_val)], task="classification", n_classes=2, score=acc
    ) == [0.25]
    rmse = metrics.get("neg_root_mean_squared_error").of_predictions
    got = diagnose.trivial_scores(
        [(np.array([1.0, 3.0]), np.array([2.0, 4.0]))], task="regression", n_classes=0, score=rmse
    )
    assert got == pytest.approx([-np.sqrt(2.0)])


# --- real networks: a deep sigmoid one vanishes, an unclipped high learning rate explodes -------


def _train(config: TrialConfig) -> np.ndarray:
    from selector import spec as sp

    s = sp.parse(
        {
            "name": "t",
            "metric": "accuracy",
            "data": {"source": "sklearn:breast_cancer"},
            "cv": {"folds": 3},
            "training": {"max_epochs": 12, "patience": 12, "device": "cpu"},
        },
        origin="t",
    )
    from selector import data

    dev = data.dev_set(data.prepare(s))
    folds = bundled_folds("breast_cancer")
    return np.asarray(objective.train(s, dev, folds, config, seed=1).grad_norms)


def test_a_deep_sigmoid_network_under_sgd_has_vanishing_gradients() -> None:
    config = TrialConfig(depth=5, width=64, activation="sigmoid", optimizer="sgd", lr=0.01)
    assert diagnose.gradient_health(_train(config)) == "vanishing"
    relu = TrialConfig(depth=5, width=64, activation="relu", optimizer="sgd", lr=0.01)
    assert diagnose.gradient_health(_train(relu)) == "healthy"


def test_an_unclipped_high_learning_rate_has_exploding_gradients() -> None:
    config = TrialConfig(depth=3, width=256, activation="relu", optimizer="rmsprop", lr=0.1)
    assert diagnose.gradient_health(_train(config)) == "exploding"
