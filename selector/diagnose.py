"""The diagnosis of a trial, computed when it is shown, against the study as it is now.

A label that depends on the rest of the study ("underfit": far below what other configs reach)
goes stale the moment a better trial finishes, so nothing here is recorded: `of_study` labels
every complete trial from the records and the study's trivial baseline, and `status`, the report,
the dashboard's notes and figures all call it.

Scores are greater-is-better (error metrics are negated). Labels, checked in this order:

- *not learning*: the mean CV score is no better than the trivial predictor of each fold (its
  training rows' majority class or class frequencies; their mean for regression) by more than
  the margin. Never "good fit", whatever the fold spread.
- *overfit*: the generalization gap (train − validation, mean over folds at the best epoch) is
  above the tolerance: the margin, or twice the standard error of the per-fold gaps when the
  folds disagree more than that.
- *underfit*: the network cannot fit its own training rows: its training score falls short of
  both the study's best training score and its best validation score by more than the tolerance.
- *too noisy to tell*: neither of the above, but the folds disagree so much (twice the standard
  error of the gaps above `NOISY` margins) that a gap of that size could not have been seen.
- *good fit* otherwise.

Beside the fit label: *stopped while improving* (the best epoch is the last one allowed: more
epochs may help) and the gradients' health (*vanishing*, *exploding*, *healthy*).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from selector.record import TrialRecord

Fit = Literal["not learning", "overfit", "underfit", "too noisy to tell", "good fit"]
Gradients = Literal["healthy", "vanishing", "exploding"]
FITS: tuple[Fit, ...] = ("good fit", "overfit", "underfit", "not learning", "too noisy to tell")

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
# The smallest gap (or shortfall) called a difference, as a share of the metric's scale: 0.02 of
# a 0..1 score; for error metrics 2% of the trivial predictor's error (the target's own spread).
MARGIN = 0.02
# Folds whose gaps scatter more than this many margins (two standard errors) cannot tell a label.
NOISY = 5.0
# Gradient health from the per-epoch, per-layer norms (input layer first, output layer last):
# vanishing when the input layer's norm is below 1/100 of the output layer's in at least half of
# the epochs (a 5-layer sigmoid network under SGD: 1e-4 to 9e-4; ReLU networks: 0.4 and more);
# exploding when the global norm grows past 100 times its first epoch's, or is not finite
# (RMSprop at lr 0.1 or Adam at lr 0.3, unclipped: 1e5 times).
VANISHING_RATIO = 1e-2
EXPLODING_GROWTH = 1e2


@dataclass(frozen=True)
class Diagnosis:
    fit: Fit
    gradients: Gradients
    still_improving: bool

    @property
    def label(self) -> str:
        """One line: the fit label, then what else is wrong."""
        extra = ["stopped while improving"] if self.still_improving else []
        if self.gradients != "healthy":
            extra.append(f"gradients {self.gradients}")
        return ", ".join([self.fit, *extra])


@dataclass(frozen=True)
class Context:
    """What a trial's label is measured against: the study's best scores now, its trivial
    baseline, the metric's scale and the epochs allowed."""

    metric: str
    best_val: float
    best_train: float
    baseline: float | None
    max_epochs: int

    @property
    def margin(self) -> float:
        if self.metric in BOUNDED:
            return MARGIN
        if self.baseline is not None and math.isfinite(self.baseline) and self.baseline != 0:
            return MARGIN * abs(self.baseline)
        return MARGIN * max(abs(self.best_val), 1e-12)


def _se(values: Sequence[float] | np.ndarray) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) >= 2 else 0.0


def fit_label(
    *,
    val: float,
    train: float,
    fold_gaps: Sequence[float] | np.ndarray,
    ctx: Context,
) -> Fit:
    m = ctx.margin
    if ctx.baseline is not None and val <= ctx.baseline + m:
        return "not learning"
    noise = 2 * _se(fold_gaps)
    tolerance = max(m, noise)
    if train - val > tolerance:
        return "overfit"
    if min(ctx.best_train, ctx.best_val) - train > tolerance:
        return "underfit"
    if noise > NOISY * m:
        return "too noisy to tell"
    return "good fit"


def gradient_health(norms: np.ndarray | Sequence[Sequence[float]]) -> Gradients:
    """From per-epoch, per-layer gradient norms (input layer first, output layer last)."""
    g = np.asarray(norms, dtype=float)
    if g.size == 0:
        return "healthy"
    if not np.isfinite(g).all():
        return "exploding"
    total = np.sqrt((g**2).sum(axis=1))
    if total[0] > 0 and total.max() > EXPLODING_GROWTH * total[0]:
        return "exploding"
    if g.shape[1] >= 2:
        out = g[:, -1]
        ratio = np.divide(g[:, 0], out, out=np.ones_like(out), where=out > 0)
        if np.mean(ratio < VANISHING_RATIO) >= 0.5:
            return "vanishing"
    return "healthy"


def diagnose(r: TrialRecord, ctx: Context) -> Diagnosis:
    """The diagnosis of one complete trial."""
    assert r.value is not None
    return Diagnosis(
        fit=fit_label(val=r.value, train=r.train_score, fold_gaps=r.fold_gaps, ctx=ctx),
        gradients=gradient_health(r.curves.grads) if r.curves is not None else "healthy",
        still_improving=r.best_epoch is not None and r.best_epoch >= ctx.max_epochs,
    )


def context(
    records: Sequence[TrialRecord],
    *,
    metric: str,
    baseline: float | None,
    max_epochs: int,
    best: tuple[float, float] = (-math.inf, -math.inf),
) -> Context:
    """The study's best scores over its complete `records`, and over other complete trials
    whose best (mean CV score, training score) is `best` (`record.best_scores`)."""
    done = [r for r in records if r.complete]
    return Context(
        metric=metric,
        best_val=max(
            max((float(r.value) for r in done), default=-math.inf),  # type: ignore[arg-type]
            best[0],
        ),
        best_train=max(max((r.train_score for r in done), default=-math.inf), best[1]),
        baseline=baseline,
        max_epochs=max_epochs,
    )


def of_study(
    records: Sequence[TrialRecord], *, metric: str, baseline: float | None, max_epochs: int
) -> dict[int, Diagnosis]:
    """The diagnosis of every complete trial, by trial number, against the study as it is now:
    the one function every view calls."""
    ctx = context(records, metric=metric, baseline=baseline, max_epochs=max_epochs)
    return {r.number: diagnose(r, ctx) for r in records if r.complete}


def trivial_scores(
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    task: str,
    n_classes: int,
    score: object,
) -> list[float]:
    """Each fold's score of the trivial predictor fit on its training targets: the class
    frequencies (labels: the majority class) for classification, the mean for regression.
    `folds` are (y_train, y_val) pairs; `score(y_true, pred, n_classes)` is the study's metric
    with `engine.score`'s meaning (probabilities, argmax taken for label metrics)."""
    out = []
    for y_train, y_val in folds:
        if task == "classification":
            freq = np.bincount(y_train.astype(int), minlength=n_classes) / len(y_train)
            pred = np.tile(freq, (len(y_val), 1))
        else:
            pred = np.full(len(y_val), float(np.mean(y_train)))
        out.append(float(score(y_val, pred, n_classes)))  # type: ignore[operator]
    return out
