"""BBC-CV: the bootstrap bias-corrected cross-validation estimate of a selected config.

The best mean CV score of many trials is optimistically biased: it is a maximum over noisy scores.
Tsamardinos, Greasidou and Borboudakis ("Bootstrapping the out-of-sample predictions for efficient
and accurate cross-validation", Machine Learning 107, 2018) estimate the performance of the
*selection procedure* instead, without training anything again: from the out-of-fold predictions
of every dev row by each candidate config, draw B bootstrap samples of rows; on each, select a
config with the rule on the in-bag rows and score it on the out-of-bag rows. The estimate is the
mean of those out-of-bag scores, the 90% interval their 5th and 95th percentiles.

A bootstrap sample is a vector of counts over the rows (how often each row was drawn), so for the
metrics that are weighted sums of per-row quantities (accuracy, balanced accuracy, log loss, the
squared and absolute errors, r2) the in-bag scores of every candidate on every sample are one
matrix product (B x n counts) @ (n x C quantities). The other metrics (f1*, matthews_corrcoef,
roc_auc, explained_variance) are scored by scikit-learn one sample at a time, which is slow: there
`bbc_cv` draws at most `FALLBACK_BOOTSTRAPS` samples and selects among the `FALLBACK_CANDIDATES`
candidates with the best score on all rows only.

Only numpy is imported here (read-only commands import this module and must start fast);
scikit-learn is imported on the fallback path alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

RULES = ("best", "one-se")

# The fallback (per-sample scikit-learn) path: this many bootstrap samples at most, and selection
# among this many candidates (those with the best score on all rows).
FALLBACK_BOOTSTRAPS = 200
FALLBACK_CANDIDATES = 30

# What each of `selector.metrics.METRICS` scores: int labels, class probabilities or values.
NEEDS: dict[str, str] = {
    "accuracy": "labels",
    "balanced_accuracy": "labels",
    "f1": "labels",
    "f1_macro": "labels",
    "f1_weighted": "labels",
    "matthews_corrcoef": "labels",
    "roc_auc": "proba",
    "neg_log_loss": "proba",
    "r2": "values",
    "explained_variance": "values",
    "neg_mean_squared_error": "values",
    "neg_root_mean_squared_error": "values",
    "neg_mean_absolute_error": "values",
}

# The metrics scored by matrix products; the others take the scikit-learn fallback.
VECTORIZED = (
    "accuracy",
    "balanced_accuracy",
    "neg_log_loss",
    "neg_mean_squared_error",
    "neg_root_mean_squared_error",
    "neg_mean_absolute_error",
    "r2",
)

# Redraws of a bootstrap sample that left no row out of the bag, before giving up.
MAX_REDRAWS = 1000


@dataclass(frozen=True)
class Candidate:
    """One config's out-of-fold predictions of every dev row (in dev-set row order): int labels
    (n,) for label metrics (probabilities (n, C) are turned into labels by argmax, as
    `engine.score` does), probabilities (n, C) for roc_auc and neg_log_loss, values (n,) for
    regression. `n_params` and `best_epoch` order candidates by simplicity for `one-se`."""

    trial: int
    oof: np.ndarray
    n_params: int
    best_epoch: int


@dataclass(frozen=True)
class Estimate:
    """The BBC-CV estimate of the selection `rule` over `n_candidates` candidates.

    `value` is the mean out-of-bag score of the config the rule selects on each of `n_boot`
    bootstrap samples, `low`/`high` the 5th/95th percentiles of those scores; `raw_best` is the
    best candidate's score on all rows (the optimistic number) and `chosen` the trial the rule
    picks on all rows. `n_boot` counts the samples scored; on the fallback path `n_candidates` is
    how many the bootstrap selected among."""

    value: float
    low: float
    high: float
    raw_best: float
    chosen: int
    rule: str
    n_candidates: int
    n_boot: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scorer(Protocol):
    """Scores candidates on weighted rows: `weights` (S, m) are counts (or 0/1) over the rows
    `rows` (all rows when None). With `cols` None: every candidate, (S, C); with `cols` (S,): one
    candidate per weight row, (S,). NaN where the metric is undefined (e.g. no weight at all)."""

    def __call__(
        self, weights: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray: ...


# --- the vectorized scorers --------------------------------------------------------------------


def _weighted_sums(
    weights: np.ndarray, q: np.ndarray, rows: np.ndarray | None, cols: np.ndarray | None
) -> np.ndarray:
    """Sum over rows of weight x per-row quantity `q` (n, C): (S, C), or (S,) for `cols`."""
    if rows is not None:
        q = q[rows]
    w = weights.astype(q.dtype, copy=False)
    if cols is None:
        return np.asarray(w @ q, dtype=np.float64)
    return np.einsum("sm,ms->s", w, q[:, cols], dtype=np.float64)  # type: ignore[no-any-return]


def _along(v: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A per-weight-row vector (S,) shaped to broadcast against `like`, (S, C) or (S,)."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """`num / den` broadcast over candidates, NaN where `den` is 0."""
    den = _along(den, num)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


@dataclass(frozen=True)
class MeanScorer:
    """A metric that is a transform of the weighted mean of a per-row quantity `q` (n, C)."""

    q: np.ndarray
    transform: Callable[[np.ndarray], np.ndarray]

    def __call__(
        self, weights: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        total = weights.sum(axis=1, dtype=np.float64)
        return self.transform(_ratio(_weighted_sums(weights, self.q, rows, cols), total))


@dataclass(frozen=True)
class R2Scorer:
    """r2 = 1 - SSE/SST from weighted sums, with scikit-learn's conventions: NaN on fewer than two
    rows; on a constant target 1 when every error is 0, else 0."""

    sq_err: np.ndarray  # (n, C) squared errors
    y: np.ndarray  # (n,) target, centred: SST is the same, its cancellation smaller

    def __call__(
        self, weights: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        sse = _weighted_sums(weights, self.sq_err, rows, cols)
        y = self.y if rows is None else self.y[rows]
        w = weights.astype(np.float64, copy=False)
        total, sy, syy = w.sum(axis=1), w @ y, w @ y**2
        sst = syy - sy**2 / np.maximum(total, 1.0)
        constant = _along(sst <= 1e-12 * syy, sse)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(constant, np.where(sse <= 0, 1.0, 0.0), 1.0 - sse / _along(sst, sse))
        return np.where(_along(total >= 2, sse), r2, np.nan)


@dataclass(frozen=True)
class BalancedScorer:
    """Balanced accuracy: the mean over the classes present (weight > 0) of each class's weighted
    recall, from per-class weighted sums of hits."""

    hits: np.ndarray  # (n, C) 1.0 where the candidate's label is right
    y: np.ndarray  # (n,) int labels

    def __call__(
        self, weights: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        hits = self.hits if rows is None else self.hits[rows]
        y = self.y if rows is None else self.y[rows]
        recall_sum = np.zeros(1)
        n_present = np.zeros(len(weights))
        for label in np.unique(y):
            at = np.flatnonzero(y == label)
            w = weights[:, at]
            n_label = w.sum(axis=1, dtype=np.float64)
            recall = _ratio(_weighted_sums(w, hits[at], None, cols), n_label)
            recall_sum = recall_sum + np.nan_to_num(recall)
            n_present += n_label > 0
        return _ratio(recall_sum, n_present)


def _labels(oof: np.ndarray) -> np.ndarray:
    a = np.asarray(oof)
    return a.argmax(axis=1) if a.ndim == 2 else a


def _proba_true(oof: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's probability of its true class, clipped as scikit-learn's log_loss clips."""
    p = np.asarray(oof)
    eps = np.finfo(p.dtype if p.dtype.kind == "f" else np.float64).eps
    return np.asarray(np.clip(p[np.arange(len(y)), y].astype(np.float64), eps, 1 - eps))


def vectorized_scorer(metric: str, preds: Sequence[np.ndarray], y: np.ndarray) -> Scorer:
    """The matrix-product scorer of a metric in `VECTORIZED` for the candidates' predictions."""
    if metric in ("accuracy", "balanced_accuracy"):
        # 0/1 hits and integer counts: float32 products are exact (sums stay below 2**24)
        dtype = np.float32 if len(y) < 2**24 else np.float64
        hits = np.stack([_labels(p) == y for p in preds], axis=1).astype(dtype)
        if metric == "accuracy":
            return MeanScorer(hits, lambda m: m)
        return BalancedScorer(hits, y)
    if metric == "neg_log_loss":
        labels = np.asarray(y, dtype=np.int64)
        nll = np.stack([-np.log(_proba_true(p, labels)) for p in preds], axis=1)
        return MeanScorer(nll, np.negative)
    err = np.stack([np.asarray(p, dtype=np.float64) for p in preds], axis=1) - y[:, None]
    if metric == "neg_mean_absolute_error":
        return MeanScorer(np.abs(err), np.negative)
    if metric == "neg_mean_squared_error":
        return MeanScorer(err**2, np.negative)
    if metric == "neg_root_mean_squared_error":
        return MeanScorer(err**2, lambda m: -np.sqrt(m))
    if metric == "r2":
        yc = np.asarray(y, dtype=np.float64)
        return R2Scorer(err**2, yc - yc.mean())
    raise ValueError(f"metric {metric!r} has no vectorized scorer; use sklearn_scorer")


# --- the scikit-learn fallback -----------------------------------------------------------------


@dataclass(frozen=True)
class SklearnScorer:
    """Any metric through `selector.metrics`, one weight row at a time: the rows are repeated
    as often as their weight (a bootstrap sample as drawn). Slow; the fallback path."""

    metric: str
    preds: tuple[np.ndarray, ...]
    y: np.ndarray

    def _one(self, c: int, at: np.ndarray) -> float:
        from selector import metrics  # lazily: it imports scikit-learn

        m = metrics.get(self.metric)
        pred = self.preds[c]
        n_classes = pred.shape[1] if pred.ndim == 2 else 0
        if not len(at):
            return math.nan
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return m.score(self.y[at], pred[at], n_classes)
        except ValueError:  # e.g. roc_auc on a sample holding one class
            return math.nan

    def __call__(
        self, weights: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        rows = np.arange(weights.shape[1]) if rows is None else rows
        out = []
        for s, w in enumerate(weights):
            at = np.repeat(rows, w.astype(np.int64))
            if cols is None:
                out.append([self._one(c, at) for c in range(len(self.preds))])
            else:
                out.append([self._one(int(cols[s]), at)])
        scores = np.asarray(out, dtype=np.float64)
        return scores if cols is None else scores[:, 0]


def sklearn_scorer(metric: str, preds: Sequence[np.ndarray], y: np.ndarray) -> SklearnScorer:
    """The per-sample scikit-learn scorer (label metrics get argmax labels of probabilities)."""
    if NEEDS[metric] == "labels":
        preds = [_labels(p) for p in preds]
    return SklearnScorer(metric, tuple(np.asarray(p) for p in preds), y)


def make_scorer(metric: str, preds: Sequence[np.ndarray], y: np.ndarray) -> Scorer:
    if metric in VECTORIZED:
        return vectorized_scorer(metric, preds, y)
    return sklearn_scorer(metric, preds, y)


# --- selection ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What a rule needs besides scores: the rows of each fold, and each candidate's simplicity
    rank (0 the simplest: fewest n_params, then fewest best_epoch; equal keys share a rank)."""

    fold_rows: tuple[np.ndarray, ...]
    simplicity: np.ndarray  # (C,) int

    @classmethod
    def of(cls, candidates: Sequence[Candidate], fold_of_row: np.ndarray) -> Selection:
        folds = np.unique(fold_of_row)
        keys = [(c.n_params, c.best_epoch) for c in candidates]
        rank = {k: i for i, k in enumerate(sorted(set(keys)))}
        return cls(
            tuple(np.flatnonzero(fold_of_row == k) for k in folds),
            np.asarray([rank[k] for k in keys], dtype=np.int64),
        )

    def take(self, keep: np.ndarray) -> Selection:
        return Selection(self.fold_rows, self.simplicity[keep])


def _first_max(scores: np.ndarray) -> np.ndarray:
    """Each row's highest-scoring column, the first on ties (as `max` over trials in order);
    NaN scores never win unless all are NaN."""
    return np.where(np.isnan(scores), -np.inf, scores).argmax(axis=1)  # type: ignore[no-any-return]


def standard_error(fold_scores: np.ndarray) -> np.ndarray:
    """std(ddof=1)/sqrt(K) of each row's fold scores, over the folds scored (not NaN); 0 with
    fewer than two (as `export.standard_error`)."""
    k = (~np.isnan(fold_scores)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.nanstd(fold_scores, axis=1, ddof=1) / np.sqrt(k)
    return np.where(k >= 2, se, 0.0)


def select(
    scorer: Scorer, weights: np.ndarray, rule: str, sel: Selection
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate `rule` picks on each weight row, and every candidate's score there.

    `best`: the highest score. `one-se` (as `export.choose`): the simplest candidate whose score
    is within one standard error of the best's, that error from the best's per-fold scores on
    the weighted rows of each fold (folds without weight are left out); the better score among
    equally simple ones, then the first."""
    scores = scorer(weights)
    best = _first_max(scores)
    if rule == "best":
        return best, scores
    folds = np.stack([scorer(weights[:, rows], rows, best) for rows in sel.fold_rows], axis=1)
    floor = scores[np.arange(len(best)), best] - standard_error(folds)
    near = np.nan_to_num(scores, nan=-np.inf) >= floor[:, None]
    rank = np.where(near, sel.simplicity[None, :], np.iinfo(np.int64).max)
    simplest = near & (rank == rank.min(axis=1, keepdims=True))
    return _first_max(np.where(simplest, scores, -np.inf)), scores


# --- the bootstrap -----------------------------------------------------------------------------


def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """`n_boot` bootstrap samples of n rows as counts (n_boot, n): how often each row was drawn.
    A sample that left no row out of the bag is drawn again."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 rows to leave one out, got {n}")
    rng = np.random.default_rng(seed)
    counts = _draw(rng, n, n_boot)
    for _ in range(MAX_REDRAWS):
        full = np.flatnonzero((counts > 0).all(axis=1))
        if not len(full):
            return counts
        counts[full] = _draw(rng, n, len(full))
    raise ValueError(f"{n} rows: bootstrap samples keep leaving no row out of the bag")


def _draw(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    picks = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(picks.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.int32)


def oob_scores(
    scorer: Scorer, counts: np.ndarray, rule: str, sel: Selection
) -> tuple[np.ndarray, np.ndarray]:
    """For each bootstrap sample (a row of `counts`): the candidate the rule selects on the
    in-bag rows, and its score on the out-of-bag rows."""
    chosen, _ = select(scorer, counts, rule, sel)
    return chosen, scorer((counts == 0).astype(counts.dtype), None, chosen)


# --- the estimate ------------------------------------------------------------------------------


def _check(
    candidates: Sequence[Candidate],
    y: np.ndarray,
    fold_of_row: np.ndarray,
    metric: str,
    rule: str,
    n_boot: int,
) -> None:
    if not candidates:
        raise ValueError("no candidates: BBC-CV needs at least one config's predictions")
    if metric not in NEEDS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(NEEDS)}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n = len(y)
    if fold_of_row.shape != (n,):
        raise ValueError(f"fold_of_row has shape {fold_of_row.shape}, expected ({n},)")
    for c in candidates:
        if len(c.oof) != n:
            raise ValueError(f"trial {c.trial}: {len(c.oof)} out-of-fold predictions, {n} rows")
        if NEEDS[metric] == "proba" and np.ndim(c.oof) != 2:
            raise ValueError(f"trial {c.trial}: {metric} needs class probabilities (n, C)")


def _fallback_subset(raw: np.ndarray) -> np.ndarray:
    """The `FALLBACK_CANDIDATES` best candidates by score on all rows, in their given order (so
    ties still go to the first)."""
    top = np.argsort(-np.nan_to_num(raw, nan=-np.inf), kind="stable")
    return np.sort(top[:FALLBACK_CANDIDATES])


def bbc_cv(
    candidates: Sequence[Candidate],
    y: np.ndarray,
    fold_of_row: np.ndarray,
    metric: str,
    *,
    rule: str = "best",
    n_boot: int = 1000,
    seed: int = 0,
) -> Estimate:
    """The BBC-CV estimate of selecting among `candidates` with `rule`, scored by `metric`
    (greater is better, as in `selector.metrics`). `y` is the dev rows' target and
    `fold_of_row` the fold each dev row is validated in. One candidate: its plain bootstrap
    out-of-bag score (no selection, no selection bias). Ties go to the first candidate given.

    Samples whose out-of-bag score is undefined (roc_auc on one class) are left out, and
    `n_boot` of the estimate counts those scored. Metrics outside `VECTORIZED` draw at most
    `FALLBACK_BOOTSTRAPS` samples and select among the `FALLBACK_CANDIDATES` best candidates on
    all rows only (the choice on all rows is still made among all of them)."""
    y, fold_of_row = np.asarray(y), np.asarray(fold_of_row)
    _check(candidates, y, fold_of_row, metric, rule, n_boot)
    scorer = make_scorer(metric, [c.oof for c in candidates], y)
    sel = Selection.of(candidates, fold_of_row)
    pick, raw = select(scorer, np.ones((1, len(y)), dtype=np.int32), rule, sel)
    keep = np.arange(len(candidates))
    if metric not in VECTORIZED:
        n_boot, keep = min(n_boot, FALLBACK_BOOTSTRAPS), _fallback_subset(raw[0])
        scorer = make_scorer(metric, [candidates[int(i)].oof for i in keep], y)
        sel = sel.take(keep)
    _, oob = oob_scores(scorer, bootstrap_counts(len(y), n_boot, seed), rule, sel)
    oob = oob[np.isfinite(oob)]
    if not len(oob):
        raise ValueError(f"{metric} is undefined on every out-of-bag sample")
    low, high = np.percentile(oob, [5, 95])
    return Estimate(
        value=float(oob.mean()),
        low=float(low),
        high=float(high),
        raw_best=float(np.nanmax(raw[0])),
        chosen=candidates[int(pick[0])].trial,
        rule=rule,
        n_candidates=len(keep),
        n_boot=len(oob),
    )
