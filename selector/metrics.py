"""The scores a study can optimise, named as scikit-learn's scorers are, greater always better."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn import metrics as skm

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Metric:
    """A scorer: `score(y_true, prediction)` where prediction is labels, probabilities or values."""

    name: str
    task: Task
    needs: Literal["labels", "proba", "values"]
    fn: Callable[..., float]
    sign: float = 1.0

    def score(self, y_true: np.ndarray, pred: np.ndarray, n_classes: int = 0) -> float:
        if self.needs == "proba":
            return self.sign * float(self.fn(y_true, pred, n_classes))
        return self.sign * float(self.fn(y_true, pred))


def _accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """`accuracy_score` for 1-D label arrays, the same float without its input checks: those cost
    0.5 ms a call, and a trial scores every fold every epoch (a digits trial: 105 calls, 5% of its
    time). Anything else goes to scikit-learn."""
    y, pred = np.asarray(y), np.asarray(pred)
    if y.ndim != 1 or pred.shape != y.shape or y.dtype.kind not in "iub" or not len(y):
        return float(skm.accuracy_score(y, pred))
    return float(np.average(y == pred))


def _roc_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    if n_classes == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    return float(skm.roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(n_classes)))


def _log_loss(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    return float(skm.log_loss(y, proba, labels=np.arange(n_classes)))


def _f1(average: str) -> Callable[[np.ndarray, np.ndarray], float]:
    return lambda y, p: float(skm.f1_score(y, p, average=average, zero_division=0))


def _rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(skm.mean_squared_error(y, p)))


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", "classification", "labels", _accuracy),
        Metric("balanced_accuracy", "classification", "labels", skm.balanced_accuracy_score),
        Metric("f1", "classification", "labels", _f1("binary")),
        Metric("f1_macro", "classification", "labels", _f1("macro")),
        Metric("f1_weighted", "classification", "labels", _f1("weighted")),
        Metric("matthews_corrcoef", "classification", "labels", skm.matthews_corrcoef),
        Metric("roc_auc", "classification", "proba", _roc_auc),
        Metric("neg_log_loss", "classification", "proba", _log_loss, -1.0),
        Metric("r2", "regression", "values", skm.r2_score),
        Metric("explained_variance", "regression", "values", skm.explained_variance_score),
        Metric("neg_mean_squared_error", "regression", "values", skm.mean_squared_error, -1.0),
        Metric("neg_root_mean_squared_error", "regression", "values", _rmse, -1.0),
        Metric("neg_mean_absolute_error", "regression", "values", skm.mean_absolute_error, -1.0),
    ]
}


def get(name: str) -> Metric:
    return METRICS[name]
