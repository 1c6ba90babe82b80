"""Label a trial: over/underfit or good fit, and the health of its gradients."""

from __future__ import annotations

import math
from typing import Literal

Fit = Literal["overfit", "underfit", "good fit"]
Gradients = Literal["healthy", "vanishing", "exploding"]

BOUNDED = {
    "accuracy",
    "balanced_accuracy",
    "f1",
    "f1_macro",
    "f1_weighted",
    "roc_auc",
    "matthews_corrcoef",
    "r2",
    "explained_variance",
}
VANISHING_RATIO = 1e-3
EXPLODING_GROWTH = 1e3


def margin(metric: str, val_score: float) -> float:
    """The smallest train-validation gap called overfitting: 0.02 for scores on a 0..1 scale,
    10% of the validation loss for error metrics (whose scale is the data's)."""
    if metric in BOUNDED:
        return 0.02
    return 0.1 * abs(val_score)


def fit_label(*, train: float, val: float, fold_std: float, study_best: float, metric: str) -> Fit:
    """Overfit: the gap (train - validation) is above the tolerance max(2 x fold std, margin).
    Underfit: the training score falls short of the study's best validation score by more than
    the same tolerance (a network that cannot fit its own training rows as well as another
    config predicts unseen ones). Otherwise a good fit.

    Without the tolerance on the underfit side, on easy data the best trials themselves read
    "underfit": penguins' best trials score 1.0 in CV with a training score of 0.993."""
    tolerance = max(2 * fold_std, margin(metric, val))
    if train - val > tolerance:
        return "overfit"
    if study_best - train > tolerance:
        return "underfit"
    return "good fit"


def gradient_health(norms: list[list[float]]) -> Gradients:
    """From per-epoch, per-layer gradient norms (input layer first, output layer last)."""
    if not norms:
        return "healthy"
    if any(not math.isfinite(x) for epoch in norms for x in epoch):
        return "exploding"
    first = norms[0]
    for epoch in norms:
        if any(x > EXPLODING_GROWTH * max(f, 1e-12) for x, f in zip(epoch, first, strict=True)):
            return "exploding"
    last = norms[-1]
    if last[-1] > 0 and last[0] / last[-1] < VANISHING_RATIO:
        return "vanishing"
    return "healthy"
