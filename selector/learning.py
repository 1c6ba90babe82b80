"""The learning curve over training-set size of the study's chosen trial: would more data help?

`compute` cross-validates the chosen config (`selection.current`; rebuilt through the search
space, with its trial's training seed, on the study's folds) on growing shares of each fold's
training rows. Each share is a seeded subsample of the fold's training part, stratified by class
for classification and nested (a larger share holds every row of a smaller one), and the fold's
preprocessing is fit on that subsample alone. The validation part stays whole, so the validation
scores at every size are measured on the same rows and comparable; at share 1 the point is the
trial itself. Only dev rows are read: the test rows stay sealed.

The curve is recorded as the study system attr `selector:learning_curve` (the latest one), so that
the report, which never trains, can show it; `verdict` says in one sentence what it means.

This module imports neither torch nor the engine at import time (the report reads curves through
it); `compute` imports them when it trains.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import optuna

from selector import record, selection, storage
from selector.errors import RefusedError, SelectorError, StudyError
from selector.selection import Choice
from selector.spec import StudySpec

if TYPE_CHECKING:
    from selector.data import DevSet

ATTR = "selector:learning_curve"
DEFAULT_SIZES = (0.1, 0.25, 0.5, 0.75, 1.0)
# A regression subsample keeps at least this many rows (its target is standardised by their
# spread); a classification subsample keeps at least one row of every class.
MIN_REGRESSION_ROWS = 2

Kind = Literal["more data would help", "the gap is closing", "the model has saturated"]


# --- the curve -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """The chosen config cross-validated on `share` of each fold's training rows: `rows` training
    rows per fold (mean over folds), the per-fold scores on those rows and on the whole
    validation part, at the best epoch."""

    share: float
    rows: int
    train_scores: tuple[float, ...]
    val_scores: tuple[float, ...]

    @property
    def train(self) -> float:
        return float(np.mean(self.train_scores))

    @property
    def train_std(self) -> float:
        return float(np.std(self.train_scores))

    @property
    def val(self) -> float:
        return float(np.mean(self.val_scores))

    @property
    def val_std(self) -> float:
        """The fold spread: the standard deviation of the validation score over folds."""
        return float(np.std(self.val_scores))

    @property
    def gap(self) -> float:
        return self.train - self.val


@dataclass(frozen=True)
class LearningCurve:
    """A study's recorded learning curve: of which trial, chosen how, and its points by size."""

    study: str
    trial: int
    choice: Choice
    metric: str
    points: tuple[Point, ...]
    computed_at: str
    seconds: float

    def to_attr(self) -> dict[str, Any]:
        """The study system attr: JSON, columnar (one list per quantity, one entry per size)."""
        p = self.points
        return {
            "v": 1,
            "trial": self.trial,
            "choice": self.choice.as_dict(),
            "metric": self.metric,
            "sizes": [x.share for x in p],
            "rows": [x.rows for x in p],
            "train_mean": [_r(x.train) for x in p],
            "train_std": [_r(x.train_std) for x in p],
            "val_mean": [_r(x.val) for x in p],
            "val_std": [_r(x.val_std) for x in p],
            "train_fold_scores": [[_r(s) for s in x.train_scores] for x in p],
            "val_fold_scores": [[_r(s) for s in x.val_scores] for x in p],
            "computed_at": self.computed_at,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_attr(cls, study: str, d: dict[str, Any]) -> LearningCurve:
        c = d["choice"]
        points = tuple(
            Point(float(s), int(n), tuple(map(float, tr)), tuple(map(float, va)))
            for s, n, tr, va in zip(
                d["sizes"], d["rows"], d["train_fold_scores"], d["val_fold_scores"], strict=True
            )
        )
        return cls(
            study=study,
            trial=int(d["trial"]),
            choice=Choice(c["rule"], int(c["trial"]), c.get("by"), c.get("at")),
            metric=str(d["metric"]),
            points=points,
            computed_at=str(d["computed_at"]),
            seconds=float(d["seconds"]),
        )

    def as_dict(self) -> dict[str, Any]:
        """What `--json` prints: the stored attr, the study and the verdict."""
        v = verdict(self.points, self.metric)
        return {"study": self.study, **self.to_attr(), "verdict": dataclasses.asdict(v)}


def _r(x: float) -> float:
    return round(float(x), 6)


# --- what it says ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    sentence: str


def verdict(points: Sequence[Point], metric: str) -> Verdict:
    """One sentence on what the curve says, by these rules (points ordered by share; `last` is
    the largest share, `prev` the one before it, `first` the smallest; `spread` is the larger
    fold spread of the last two, max(prev.val_std, last.val_std): a step between two noisy
    points is no smaller than either's noise, and folds that all score 1.0 at the largest share
    say nothing of how sure the rise to it is; rise = last.val − prev.val; gap = train −
    validation):

    1. **more data would help**: rise > spread — validation still rising over the last step by
       more than the folds disagree;
    2. **the gap is closing**: not 1, but the gap is still shrinking over the last step
       (last.gap < prev.gap) while validation still rises (rise > 0), and across the whole curve
       the gap shrank by more than the spread (first.gap − last.gap > spread): more rows are
       closing the distance between train and validation, slowly;
    3. **the model has saturated** otherwise: validation flat (within the spread) or falling at
       the largest sizes, so more rows like these are unlikely to help.

    Needs at least two points."""
    if len(points) < 2:
        raise ValueError("a learning curve needs at least two sizes")
    pts = sorted(points, key=lambda p: p.share)
    first, prev, last = pts[0], pts[-2], pts[-1]
    spread, rise = max(prev.val_std, last.val_std), last.val - prev.val
    step = f"from {prev.rows} to {last.rows} training rows"
    if rise > spread:
        return Verdict(
            "more data would help",
            f"more data would help: validation {metric} rose by {rise:.4f} {step}, more than "
            f"the fold spread ({spread:.4f})",
        )
    if last.gap < prev.gap and rise > 0 and first.gap - last.gap > spread:
        return Verdict(
            "the gap is closing",
            f"the gap is closing: train − validation fell from {first.gap:.4f} to "
            f"{last.gap:.4f} as the training rows grew from {first.rows} to {last.rows}, and "
            f"validation {metric} still rises (+{rise:.4f} over the last step, within the fold "
            f"spread {spread:.4f}): more data may help, slowly",
        )
    how = "within" if abs(rise) <= spread else "a fall of more than"
    return Verdict(
        "the model has saturated",
        f"the model has saturated: validation {metric} changed by {rise:+.4f} {step}, {how} "
        f"the fold spread ({spread:.4f}); more rows like these are unlikely to help",
    )


# --- sizes and subsamples --------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[float, ...]:
    """`--sizes`: comma-separated shares of each fold's training rows (`check_sizes`)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SelectorError(
            f"--sizes {text!r}: not a comma-separated list of numbers (e.g. 0.1,0.25,0.5,1.0)"
        ) from None
    return check_sizes(values, "--sizes")


def check_sizes(values: Sequence[float], name: str) -> tuple[float, ...]:
    """Shares of each fold's training rows in (0, 1], at least two different ones; returned
    sorted, without repeats."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) != len(values):
        raise SelectorError(f"{name} {list(values)!r}: give numbers, e.g. [0.25, 0.5, 1.0]")
    bad = [v for v in numbers if not (math.isfinite(v) and 0 < v <= 1)]
    if bad:
        raise SelectorError(
            f"{name}: {bad[0]:g} is not a share of the training rows; use values in (0, 1]"
        )
    sizes = tuple(sorted(set(numbers)))
    if len(sizes) < 2:
        raise SelectorError(f"{name}: give at least two different shares, e.g. 0.25, 1.0")
    return sizes


def subsample(
    train_rows: np.ndarray, labels: np.ndarray | None, share: float, seed: int
) -> np.ndarray:
    """`share` of a fold's training rows, in their original order: seeded, and stratified when
    `labels` (the class of each of `train_rows`) are given, each class keeping round(share × its
    rows) and at least one. The same seed gives nested subsamples: each class's rows are
    permuted once and a share takes a prefix, so a larger share holds every row of a smaller
    one. Share 1 is every row."""
    if share >= 1:
        return train_rows
    rng = np.random.default_rng(seed)
    if labels is None:
        groups, least = [np.arange(len(train_rows))], MIN_REGRESSION_ROWS
    else:
        groups, least = [np.flatnonzero(labels == c) for c in np.unique(labels)], 1
    keep = [rng.permutation(g)[: max(least, round(share * len(g)))] for g in groups]
    picked: np.ndarray = train_rows[np.sort(np.concatenate(keep))]
    return picked


def fold_seed(study_seed: int, fold: int) -> int:
    """Each fold's subsampling seed, derived from the study seed: the same rows for every trial
    and every run."""
    return int(np.random.SeedSequence([study_seed, fold, 13]).generate_state(1)[0])


# --- computing and recording -----------------------------------------------------------------


def compute(url: str, name: str, sizes: Sequence[float] = DEFAULT_SIZES) -> LearningCurve:
    """Cross-validate the study's chosen trial at each size, record the curve in the study
    (replacing an earlier one), and return it."""
    from selector import data

    start = time.perf_counter()
    study, rec = record.open_study(url, name)
    records = record.trials(study)
    choice = selection.current(url, name, records)
    if choice is None:
        raise RefusedError(f"study {name!r} has no complete trial yet; run `selector run` first")
    trial = next(r for r in records if r.number == choice.trial)
    prep = data.prepare(rec.spec)
    if prep.fingerprints.as_dict() != rec.fingerprints:
        raise StudyError(f"study {name!r}: the data differ from the study's; cannot train")
    dev = data.dev_set(prep)
    points = tuple(_point(rec.spec, dev, trial, share) for share in sorted(set(sizes)))
    curve = LearningCurve(
        study=name,
        trial=trial.number,
        choice=choice,
        metric=rec.spec.metric,
        points=points,
        computed_at=dt.datetime.now(dt.UTC).isoformat(),
        seconds=time.perf_counter() - start,
    )
    _store(study, curve)
    return curve


def _point(spec: StudySpec, dev: DevSet, trial: record.TrialRecord, share: float) -> Point:
    """The trial's config cross-validated on `share` of each fold's training rows."""
    from selector import data, objective

    clf = dev.task == "classification"
    folds = tuple(
        (subsample(tr, dev.y[tr] if clf else None, share, fold_seed(spec.seed, k)), va)
        for k, (tr, va) in enumerate(dev.folds)
    )
    part = dataclasses.replace(dev, folds=folds)
    config = trial.config(spec.space)
    result = objective.train(spec, part, list(data.iter_folds(part)), config, int(trial.seed or 0))
    return Point(
        share=share,
        rows=round(float(np.mean([len(tr) for tr, _ in folds]))),
        train_scores=tuple(float(s) for s in result.train_scores),
        val_scores=tuple(float(s) for s in result.fold_scores),
    )


def _store(study: optuna.Study, curve: LearningCurve) -> None:
    value = curve.to_attr()
    storage.retrying(lambda: study._storage.set_study_system_attr(study._study_id, ATTR, value))


def stored(study: optuna.Study) -> LearningCurve | None:
    """The study's recorded learning curve, or None before `selector learning-curve` ran."""
    attrs = storage.retrying(lambda: study._storage.get_study_system_attrs(study._study_id))
    d = attrs.get(ATTR)
    if not isinstance(d, dict) or d.get("v") != 1:
        return None
    return LearningCurve.from_attr(study.study_name, d)


# --- the text of the command -----------------------------------------------------------------


def text(curve: LearningCurve) -> str:
    """The command's table, its verdict and where the curve was recorded."""
    k = len(curve.points[0].val_scores) if curve.points else 0
    lines = [
        f"learning curve of {curve.choice.describe()} in study {curve.study!r}: "
        f"{curve.metric}, mean ± std over {k} folds, each validation part whole",
        f"  {'share':>5}  {'rows':>6}  {'train':^15}  {'validation':^15}  {'gap':>7}",
    ]
    for p in curve.points:
        lines.append(
            f"  {p.share:>5.0%}  {p.rows:>6}  {p.train:.4f} ± {p.train_std:.4f}  "
            f"{p.val:.4f} ± {p.val_std:.4f}  {p.gap:>+7.4f}"
        )
    lines.append(verdict(curve.points, curve.metric).sentence)
    lines.append(
        f"recorded in the study ({ATTR}, {curve.seconds:.1f} s); `selector report` shows it"
    )
    return "\n".join(lines)
