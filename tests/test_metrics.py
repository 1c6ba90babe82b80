"""The scores a study optimises equal scikit-learn's, including the fast paths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from selector import metrics


def _proba(rng: np.random.Generator, n: int, k: int, decimals: int) -> np.ndarray:
    p = rng.random((n, k)).round(decimals) + 1e-3  # rounded: many ties
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("decimals", [1, 2, 8])
def test_roc_auc_equals_scikit_learns(k: int, decimals: int) -> None:
    rng = np.random.default_rng(k * 10 + decimals)
    auc = metrics.get("roc_auc")
    for n in (k + 3, 91, 400):
        y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
        p = _proba(rng, n, k, decimals)
        if k == 2:
            want = roc_auc_score(y, p[:, 1])
        else:
            want = roc_auc_score(y, p, multi_class="ovr", labels=np.arange(k))
        assert metrics._ranked_roc_auc(y, p, k) is not None  # the fast path is the one tested
        assert auc.of_predictions(y, p, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 114, 1000])
def test_average_ranks_equal_scipys_rankdata(n: int) -> None:
    """The fast ROC AUC's ranks are scipy's, float for float, with ties, runs at either end and
    every value equal."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(n)
    for x in (rng.random(n), rng.random(n).round(1), np.full(n, 0.25), np.sort(rng.random(n))):
        assert np.array_equal(metrics.average_ranks(x), rankdata(x))


def test_roc_auc_leaves_what_scikit_learn_objects_to_it() -> None:
    """Where scikit-learn's checks object (one class only, a NaN score, probabilities that do
    not sum to 1), its own call decides: the same warning and value, or the same error."""
    auc = metrics.get("roc_auc")
    p = np.full((4, 2), 0.5)
    one_class = np.zeros(4, dtype=int)
    assert metrics._ranked_roc_auc(one_class, p, 2) is None
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(auc.of_predictions(one_class, p, 2))
    bad = p.copy()
    bad[0, 1] = np.nan
    assert metrics._ranked_roc_auc(np.array([0, 1, 0, 1]), bad, 2) is None
    with pytest.raises(ValueError, match="NaN"):
        auc.of_predictions(np.array([0, 1, 0, 1]), bad, 2)
    three = np.array([[0.5, 0.2, 0.2], [0.2, 0.5, 0.2], [0.2, 0.2, 0.5]])  # rows sum to 0.9
    assert metrics._ranked_roc_auc(np.array([0, 1, 2]), three, 3) is None
    with pytest.raises(ValueError, match="sum up to 1"):
        auc.of_predictions(np.array([0, 1, 2]), three, 3)


def _sklearn(name: str, y: np.ndarray, p: np.ndarray, k: int) -> float:
    """The study's score as scikit-learn's own call gives it (signs as the metric table's)."""
    import warnings

    import sklearn.metrics as skm

    labels = name in ("balanced_accuracy", "matthews_corrcoef") or name.startswith("f1")
    if labels:
        p = p.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("f1"):
            average = {"f1": "binary", "f1_macro": "macro", "f1_weighted": "weighted"}[name]
            return skm.f1_score(y, p, average=average, zero_division=0)
        if name == "neg_log_loss":
            return -skm.log_loss(y, p, labels=np.arange(k))
        if name == "neg_root_mean_squared_error":
            return -float(np.sqrt(skm.mean_squared_error(y, p)))
        fn = {
            "balanced_accuracy": skm.balanced_accuracy_score,
            "matthews_corrcoef": skm.matthews_corrcoef,
            "r2": skm.r2_score,
            "explained_variance": skm.explained_variance_score,
            "neg_mean_squared_error": skm.mean_squared_error,
            "neg_mean_absolute_error": skm.mean_absolute_error,
        }[name]
        sign = -1.0 if name.startswith("neg_") else 1.0
        return sign * float(fn(y, p))


CLASSIFICATION = [
    "balanced_accuracy",
    "matthews_corrcoef",
    "f1_macro",
    "f1_weighted",
    "neg_log_loss",
]
REGRESSION = [
    "r2",
    "explained_variance",
    "neg_mean_squared_error",
    "neg_root_mean_squared_error",
    "neg_mean_absolute_error",
]


@pytest.mark.parametrize("name", [*CLASSIFICATION, "f1", *REGRESSION])
def test_every_score_equals_scikit_learns(name: str) -> None:
    """Random labels and predictions with ties, classes missing from the labels or from the
    predictions, and near-perfect ones: the study's score equals scikit-learn's to 1e-12."""
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    metric = metrics.get(name)
    for trial in range(40):
        n = int(rng.integers(5, 200))
        if metric.task == "regression":
            y = rng.normal(size=n)
            p = y + rng.normal(scale=[0.0, 0.1, 1.0, 3.0][trial % 4], size=n)
            k = 0
        else:
            k = 2 if name == "f1" else int(rng.integers(2, 8))
            y = rng.integers(0, k, n)
            if trial % 3 == 0:
                y = np.where(y == k - 1, 0, y)  # a class absent from the labels
            p = _proba(rng, n, k, decimals=[1, 2, 8][trial % 3])
            if trial % 5 == 0:
                p = np.eye(k)[y] * 0.9 + 0.1 / k  # every prediction right
        want = _sklearn(name, y, p, k)
        got = metric.of_predictions(y, p, k)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (name, trial)


def test_scores_scikit_learn_objects_to_are_its_own() -> None:
    """Where scikit-learn warns or a score is undefined, its own call decides."""
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        value = metrics.get("balanced_accuracy").score(np.array([0, 0, 1]), np.array([0, 2, 1]))
    assert value == pytest.approx(0.75)
    assert metrics._f1_of("binary")(np.array([0, 0]), np.array([0, 0])) is None
    assert metrics.get("f1").score(np.array([0, 0]), np.array([0, 0])) == 0.0
    flat = np.ones(5)
    assert metrics._r2(flat, flat + 0.1) is None
    with pytest.raises(ValueError, match="NaN"):
        metrics.get("r2").score(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_scores_of_many_models_at_once_are_each_ones_own(name: str) -> None:
    """`of_prediction_rows` (a fused group scores every member's fold at once) gives each
    model's `of_predictions`, float for float: with ties, every model right, one model's
    probabilities not finite (its own call raises there, so it is left out here), and classes
    absent from the labels (scikit-learn's call decides, for every model)."""
    rng = np.random.default_rng(len(name))
    metric = metrics.get(name)
    for trial in range(12):
        n = int(rng.integers(5, 120))
        M = int(rng.integers(1, 9))
        if metric.task == "regression":
            y = rng.normal(size=n)
            preds = y + rng.normal(scale=0.5, size=(M, n))
            k = 0
        else:
            k = 2 if name in ("f1", "roc_auc") and trial % 2 else int(rng.integers(2, 11))
            k = 2 if name == "f1" else k
            y = np.concatenate([np.arange(k), rng.integers(0, k, n)])
            if trial % 4 == 3:
                y = np.where(y == k - 1, 0, y)  # a class absent from the labels
            preds = np.stack([_proba(rng, len(y), k, [1, 2, 8][(trial + m) % 3]) for m in range(M)])
            preds[0] = np.eye(k)[y] * 0.9 + 0.1 / k  # every prediction right
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = metric.of_prediction_rows(y, preds, k)
            want = [metric.of_predictions(y, p, k) for p in preds]
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {trial}")  # NaN equals NaN


def test_scores_of_many_models_leave_what_they_cannot_compute_to_each_ones_call() -> None:
    """A model whose scores are not finite, or whose one-vs-rest probabilities do not sum to
    1, goes to its own call (which raises, as scikit-learn does); labels missing a class leave
    every model to scikit-learn."""
    auc = metrics.get("roc_auc")
    y = np.array([0, 1, 0, 1])
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    bad = good.copy()
    bad[0, 1] = np.nan
    fast = metrics._ranked_roc_auc_rows(y, np.stack([good, bad]), 2)
    assert fast is not None and fast[0] == 1.0 and np.isnan(fast[1])
    with pytest.raises(ValueError, match="NaN"):
        auc.of_prediction_rows(y, np.stack([good, bad]), 2)
    assert metrics._ranked_roc_auc_rows(np.zeros(4, dtype=int), np.stack([good]), 2) is None
    three = np.array([[0.5, 0.2, 0.2], [0.2, 0.5, 0.2], [0.2, 0.2, 0.5]])  # rows sum to 0.9
    fast = metrics._ranked_roc_auc_rows(np.array([0, 1, 2]), np.stack([three, three / 0.9]), 3)
    assert fast is not None and np.isnan(fast[0]) and fast[1] == 1.0


@pytest.mark.parametrize("n", [1, 2, 7, 114])
def test_average_ranks_of_rows_are_each_rows_own(n: int) -> None:
    rng = np.random.default_rng(n)
    x = np.stack([rng.random(n), rng.random(n).round(1), np.full(n, 0.25), np.sort(rng.random(n))])
    want = np.stack([metrics.average_ranks(row) for row in x])
    assert np.array_equal(metrics.average_ranks_rows(x), want)
