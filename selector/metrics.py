"""The scores a study can optimise, named as scikit-learn's scorers are, greater always better.

scikit-learn is imported when a score is first computed, not with this module: the study file's
validation and every read-only command use the metric table without it (about 1 s of imports).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Metric:
    """A scorer: `score(y_true, prediction)` where prediction is labels, probabilities or values."""

    name: str
    task: Task
    needs: Literal["labels", "proba", "values"]
    fn: Callable[..., float]
    sign: float = 1.0
    # The best score there is (a perfect prediction): 1 for the scores, 0 for the negated
    # errors. Training stops once a trial's mean CV score reaches it (`engine.drive`).
    perfect: float = 1.0
    # `fn` for many predictions of the same `y_true` at once, `rows(y_true, given, n_classes)`
    # with labels (M, n) or probabilities (M, n, C): M values, NaN for a row `fn` must decide
    # itself; None where none can be computed so. The same floats as `fn` row by row.
    rows: Callable[..., np.ndarray | None] | None = None

    def score(self, y_true: np.ndarray, pred: np.ndarray, n_classes: int = 0) -> float:
        if self.needs == "proba":
            return self.sign * float(self.fn(y_true, pred, n_classes))
        return self.sign * float(self.fn(y_true, pred))

    def of_predictions(self, y_true: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
        """Score a model's predictions (class probabilities, or values): labels are the argmax
        where the metric needs labels."""
        if self.needs == "labels":
            return self.score(y_true, pred.argmax(axis=1), n_classes)
        return self.score(y_true, pred, n_classes)

    def of_prediction_rows(
        self, y_true: np.ndarray, preds: np.ndarray, n_classes: int
    ) -> list[float]:
        """`of_predictions` for each of M models' predictions of the same rows (`preds` (M, n, C)
        probabilities, or (M, n) values), computed together where the score allows: a fused
        group scores every member on each fold every epoch, and one call each was 4% of a
        breast_cancer search (ROC AUC: 39 against 7.7 us a member's fold, 32 members)."""
        preds = np.asarray(preds)
        given = preds.argmax(axis=2) if self.needs == "labels" else preds
        fast = None if self.rows is None else self.rows(y_true, given, n_classes)
        out = []
        for i in range(len(preds)):
            if fast is not None and not np.isnan(fast[i]):
                out.append(self.sign * float(fast[i]))
            else:
                out.append(self.of_predictions(y_true, preds[i], n_classes))
        return out


def _sk(name: str) -> Callable[..., float]:
    """scikit-learn's `sklearn.metrics.<name>`, imported at the first call."""

    def call(*args: Any, **kwargs: Any) -> float:
        return float(getattr(importlib.import_module("sklearn.metrics"), name)(*args, **kwargs))

    call.__name__ = name
    return call


def _accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """`accuracy_score` for 1-D label arrays, the same float without its input checks: those cost
    0.5 ms a call, and a trial scores every fold every epoch (a digits trial: 105 calls, 5% of its
    time). Anything else goes to scikit-learn."""
    y, pred = np.asarray(y), np.asarray(pred)
    if y.ndim != 1 or pred.shape != y.shape or y.dtype.kind not in "iub" or not len(y):
        return _sk("accuracy_score")(y, pred)
    return float(np.average(y == pred))


def _accuracy_rows(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray | None:
    """`_accuracy` of each row of labels `pred` (M, n): the same counts over the same n."""
    y, pred = np.asarray(y), np.asarray(pred)
    if y.ndim != 1 or pred.ndim != 2 or pred.shape[1:] != y.shape or y.dtype.kind not in "iub":
        return None
    if not len(y):  # scikit-learn's call decides
        return None
    return np.asarray((pred == y).mean(axis=1), dtype=np.float64)


def _roc_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    fast = _ranked_roc_auc(y, proba, n_classes)
    if fast is not None:
        return fast
    if n_classes == 2:
        return _sk("roc_auc_score")(y, proba[:, 1])
    return _sk("roc_auc_score")(y, proba, multi_class="ovr", labels=np.arange(n_classes))


def _ranked_roc_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float | None:
    """`roc_auc_score` (binary, or one-vs-rest macro over `n_classes`) from ranks: the area
    under the ROC curve is the Mann-Whitney statistic, the share of (positive, negative) pairs
    the score orders rightly, a tie counting half (the trapezoids of scikit-learn's curve), so
    the two agree to rounding (a test checks 1e-12). scikit-learn's call costs about 1.4 ms, in
    its input checks and curve; a trial scores every fold every epoch, and on breast_cancer
    that was two thirds of a fused trial's time. None (scikit-learn decides, and raises) where
    its checks would object: a class absent from `y`, scores not finite, labels not 0..n-1,
    or one-vs-rest probabilities that do not sum to 1."""
    y, proba = np.asarray(y), np.asarray(proba)
    counts = _class_counts(y, n_classes)
    if counts is None or proba.shape != (len(y), n_classes) or not np.isfinite(proba).all():
        return None
    if n_classes > 2 and not np.allclose(proba.sum(axis=1), 1.0):
        return None
    areas = []
    for c, positive, n1, n0 in _one_vs_rest(y, counts):
        ranks = average_ranks(proba[:, c])
        areas.append((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return float(np.mean(areas))


def _class_counts(y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """Each class's count in labels `y`, or None where scikit-learn's ROC AUC checks would
    object: not 1-D integer labels 0..n_classes-1 with every class present."""
    if y.ndim != 1 or y.dtype.kind not in "iu" or n_classes < 2 or not len(y) or y.min() < 0:
        return None
    counts = np.bincount(y, minlength=n_classes)
    return counts if len(counts) == n_classes and counts.all() else None


def _one_vs_rest(y: np.ndarray, counts: np.ndarray) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """ROC AUC's classes (the positive one where binary, each one against the rest where not):
    the class, its rows, their count and the others' count."""
    for c in [1] if len(counts) == 2 else range(len(counts)):
        n1 = int(counts[c])
        yield c, y == c, n1, len(y) - n1


def _ranked_roc_auc_rows(y: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray | None:
    """`_ranked_roc_auc` of each of M models' probabilities `proba` (M, n, C) for the same `y`:
    the same sums of the same half-integer ranks (exact), so the same floats. NaN for a model
    whose scores are not finite or, one-vs-rest, do not sum to 1 (its own call decides)."""
    y, proba = np.asarray(y), np.asarray(proba)
    counts = _class_counts(y, n_classes)
    if counts is None or proba.ndim != 3 or proba.shape[1:] != (len(y), n_classes):
        return None
    ok = np.isfinite(proba).all(axis=(1, 2))
    if n_classes > 2:
        ok &= np.isclose(proba.sum(axis=2), 1.0).all(axis=1)  # `np.allclose` of each model's
    areas = []
    for c, positive, n1, n0 in _one_vs_rest(y, counts):
        ranks = average_ranks_rows(np.where(ok[:, None], proba[:, :, c], 0.0))
        areas.append((ranks[:, positive].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0))
    values = areas[0] if len(areas) == 1 else np.mean(np.stack(areas, axis=1), axis=1)
    return np.where(ok, values, np.nan)


def average_ranks_rows(x: np.ndarray) -> np.ndarray:
    """`average_ranks` of each row of `x` (M, n): the same half-integers."""
    m, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    ordered = np.take_along_axis(x, order, axis=1)
    starts_run = np.empty((m, n), dtype=bool)
    starts_run[:, :1] = True
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=starts_run[:, 1:])
    ends_run = np.empty((m, n), dtype=bool)
    ends_run[:, :-1] = starts_run[:, 1:]
    ends_run[:, -1:] = True
    place = np.arange(n)
    starts = np.maximum.accumulate(np.where(starts_run, place, 0), axis=1)  # each run's first
    ends = np.minimum.accumulate(np.where(ends_run, place + 1, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((m, n), dtype=np.float64)
    np.put_along_axis(ranks, order, (starts + 1 + ends) / 2.0, axis=1)
    return ranks


def average_ranks(x: np.ndarray) -> np.ndarray:
    """`scipy.stats.rankdata(x)` of a 1-D array without NaN: 1-based ranks, ties given their
    average, the same floats (half-integers, exact). A quarter of scipy's time, which is mostly
    its argument handling: 27 against 110 us on a breast_cancer fold, and a fused group ranks
    every member's fold every epoch (7% of a breast_cancer search's time went to `rankdata`)."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_run = np.empty(len(x), dtype=bool)
    starts_run[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_run[1:])
    run = np.cumsum(starts_run) - 1  # each sorted place's run of equal values
    starts = np.flatnonzero(starts_run)
    ends = np.append(starts[1:], len(x))
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[run]  # the mean of places start+1 .. end
    return ranks


# --- scores without scikit-learn's per-call checks ---------------------------------------------
#
# A trial scores every fold at every epoch (a fused group: every member too), and scikit-learn's
# metric calls cost 0.2 to 1.4 ms each in input validation, label encoding and dispatch: on
# small data sets more than the training. The functions below compute the same number from the
# same formulas (a confusion matrix for the label scores, the same sums for the others); each
# returns None, and scikit-learn's own call decides, warns or raises, wherever scikit-learn's
# checks would object or a score is undefined. `tests/test_metrics.py` checks each against
# scikit-learn on random inputs with ties and absent classes, to 1e-12.


def _labels_ok(*arrays: np.ndarray) -> bool:
    return all(a.ndim == 1 and a.dtype.kind in "iu" and len(a) for a in arrays) and (
        len({len(a) for a in arrays}) == 1
    )


def _confusion(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """scikit-learn's `confusion_matrix` over the labels present in either (sorted)."""
    labels = np.union1d(y, pred)
    n = len(labels)
    cells = np.searchsorted(labels, y) * n + np.searchsorted(labels, pred)
    return np.bincount(cells, minlength=n * n).reshape(n, n)


def _fast_labels(
    fast: Callable[[np.ndarray, np.ndarray], float | None], name: str, **kwargs: Any
) -> Callable[[np.ndarray, np.ndarray], float]:
    sk = _sk(name)

    def call(y: np.ndarray, pred: np.ndarray) -> float:
        y, pred = np.asarray(y), np.asarray(pred)
        value = fast(y, pred) if _labels_ok(y, pred) else None
        return sk(y, pred, **kwargs) if value is None else value

    call.__name__ = name
    return call


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float | None:
    C = _confusion(y, pred)
    rows = C.sum(axis=1)
    if not rows.all():  # a predicted class absent from y: scikit-learn warns
        return None
    return float(np.mean(np.diagonal(C) / rows))


def _matthews(y: np.ndarray, pred: np.ndarray) -> float | None:
    C = _confusion(y, pred)
    t_sum = C.sum(axis=1, dtype=np.float64)
    p_sum = C.sum(axis=0, dtype=np.float64)
    n_correct = np.trace(C, dtype=np.float64)
    n_samples = p_sum.sum()
    cov_ytyp = n_correct * n_samples - np.dot(t_sum, p_sum)
    cov_ypyp = n_samples**2 - np.dot(p_sum, p_sum)
    cov_ytyt = n_samples**2 - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ypyp * cov_ytyt))


def _f1_of(average: str) -> Callable[[np.ndarray, np.ndarray], float | None]:
    def f1(y: np.ndarray, pred: np.ndarray) -> float | None:
        if average == "binary":
            if y.min() < 0 or max(y.max(), pred.max()) > 1 or pred.min() < 0:
                return None  # not 0/1 labels: scikit-learn's error
            tp = float(np.sum((y == 1) & (pred == 1)))
            denom = float(np.sum(y == 1)) + float(np.sum(pred == 1))
            return None if denom == 0 else 2.0 * tp / denom
        C = _confusion(y, pred)
        true_sum, pred_sum = C.sum(axis=1), C.sum(axis=0)
        f = 2.0 * np.diagonal(C) / (true_sum + pred_sum).astype(np.float64)
        return float(np.average(f, weights=true_sum if average == "weighted" else None))

    return f1


def _regression_ok(y: np.ndarray, p: np.ndarray) -> bool:
    return (
        y.ndim == 1
        and p.shape == y.shape
        and len(y) > 1
        and y.dtype.kind == "f"
        and p.dtype.kind == "f"
        and bool(np.isfinite(y).all() and np.isfinite(p).all())
    )


def _fast_values(
    fast: Callable[[np.ndarray, np.ndarray], float | None],
    name: str,
    after: Callable[[float], float] = float,
) -> Callable[[np.ndarray, np.ndarray], float]:
    sk = _sk(name)

    def call(y: np.ndarray, p: np.ndarray) -> float:
        y, p = np.asarray(y), np.asarray(p)
        value = fast(y, p) if _regression_ok(y, p) else None
        return after(sk(y, p) if value is None else value)

    call.__name__ = name
    return call


def _mse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.average((y - p) ** 2))


def _mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.average(np.abs(y - p)))


def _r2(y: np.ndarray, p: np.ndarray) -> float | None:
    numerator = np.sum((y - p) ** 2)
    denominator = np.sum((y - np.average(y)) ** 2)
    return None if denominator == 0 else float(1 - numerator / denominator)


def _explained_variance(y: np.ndarray, p: np.ndarray) -> float | None:
    diff = y - p
    numerator = np.average((diff - np.average(diff)) ** 2)
    denominator = np.average((y - np.average(y)) ** 2)
    return None if denominator == 0 else float(1 - numerator / denominator)


def _log_loss(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    y, proba = np.asarray(y), np.asarray(proba)
    if (
        _labels_ok(y)
        and proba.shape == (len(y), n_classes)
        and proba.dtype == np.float64
        and y.min() >= 0
        and y.max() < n_classes
        and bool(np.isfinite(proba).all())
        and proba.min() >= 0
        and proba.max() <= 1
        and np.allclose(proba.sum(axis=1), 1.0, rtol=np.sqrt(np.finfo(np.float64).eps), atol=0)
    ):  # else scikit-learn's own call: it raises, or warns that they do not sum to one
        eps = np.finfo(proba.dtype).eps
        picked = np.clip(proba, eps, 1 - eps)[np.arange(len(y)), y]
        return float(np.average(-np.log(picked)))
    return _sk("log_loss")(y, proba, labels=np.arange(n_classes))


def _f1(average: str) -> Callable[[np.ndarray, np.ndarray], float]:
    return _fast_labels(_f1_of(average), "f1_score", average=average, zero_division=0)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", "classification", "labels", _accuracy, rows=_accuracy_rows),
        Metric(
            "balanced_accuracy",
            "classification",
            "labels",
            _fast_labels(_balanced_accuracy, "balanced_accuracy_score"),
        ),
        Metric("f1", "classification", "labels", _f1("binary")),
        Metric("f1_macro", "classification", "labels", _f1("macro")),
        Metric("f1_weighted", "classification", "labels", _f1("weighted")),
        Metric(
            "matthews_corrcoef",
            "classification",
            "labels",
            _fast_labels(_matthews, "matthews_corrcoef"),
        ),
        Metric("roc_auc", "classification", "proba", _roc_auc, rows=_ranked_roc_auc_rows),
        Metric("neg_log_loss", "classification", "proba", _log_loss, -1.0, 0.0),
        Metric("r2", "regression", "values", _fast_values(_r2, "r2_score")),
        Metric(
            "explained_variance",
            "regression",
            "values",
            _fast_values(_explained_variance, "explained_variance_score"),
        ),
        Metric(
            "neg_mean_squared_error",
            "regression",
            "values",
            _fast_values(_mse, "mean_squared_error"),
            -1.0,
            0.0,
        ),
        Metric(
            "neg_root_mean_squared_error",
            "regression",
            "values",
            _fast_values(_mse, "mean_squared_error", after=lambda v: float(np.sqrt(v))),
            -1.0,
            0.0,
        ),
        Metric(
            "neg_mean_absolute_error",
            "regression",
            "values",
            _fast_values(_mae, "mean_absolute_error"),
            -1.0,
            0.0,
        ),
    ]
}


def get(name: str) -> Metric:
    return METRICS[name]


# What a person reads for the scores scikit-learn negates (errors, lower is better): the error's
# own name and value, `RMSE = 20.61`, not `neg_root_mean_squared_error = -20.6058`.
ERROR_NAMES = {
    "neg_root_mean_squared_error": "RMSE",
    "neg_mean_squared_error": "MSE",
    "neg_mean_absolute_error": "MAE",
    "neg_log_loss": "log loss",
}
SIGNIFICANT = 4  # digits of an error shown; a greater-is-better score shows 4 decimals


def label(name: str) -> str:
    """The name a person reads for metric `name`: `RMSE` for `neg_root_mean_squared_error`."""
    return ERROR_NAMES.get(name, name)


def shown_value(name: str, score: float | None) -> str:
    """A score as a person reads it: an error with its sign undone, to 4 significant digits
    (`20.61`, `0.05234`, `12346`); any other score to 4 decimals (`0.9855`); `-` for none."""
    if score is None or not math.isfinite(score):
        return "-" if score is None else str(score)
    if name not in ERROR_NAMES:
        return f"{score:.4f}"
    error = -score
    digits = SIGNIFICANT - 1 - math.floor(math.log10(abs(error))) if error else SIGNIFICANT - 1
    return f"{error:.{max(0, digits)}f}"


def shown(name: str, score: float | None) -> str:
    """Metric and score as a person reads them: `RMSE = 20.61`, `log loss = 0.05234`,
    `accuracy = 0.9855` (the `name = value` of every line a script may already parse).
    Machine-readable outputs (JSON) keep the raw, greater-is-better score."""
    return f"{label(name)} = {shown_value(name, score)}"


def shown_range(name: str, low: float, high: float) -> str:
    """An interval of scores, lower bound first once an error's sign is undone."""
    a, b = (high, low) if name in ERROR_NAMES else (low, high)
    return f"{shown_value(name, a)}, {shown_value(name, b)}"
