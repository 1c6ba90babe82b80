"""One trial: config → K-fold training → per-epoch reports and pruning → user attrs."""

from __future__ import annotations

import time
import traceback
from typing import Any

import optuna
import torch

from selector import diagnose, engine, interrupt, metrics, notes, stacked, storage
from selector.data import DevSet, FoldData, iter_folds
from selector.errors import FailReason, TrialDiverged
from selector.model import count_params
from selector.space import TrialConfig, sample_config
from selector.spec import StudySpec

MAX_TRACEBACK_CHARS = 4000


# Without a pruner the per-epoch scores are written in batches, at most this often (and at the end).
FLUSH_SECONDS = 5.0


# The median pruner's warm-up: it never prunes before this epoch (`worker.make_pruner`).
MEDIAN_WARMUP = 3


def first_prunable_epoch(pruner: str) -> int | None:
    """The first epoch at which the study's pruner can prune a trial; None for no pruner."""
    return {"none": None, "median": MEDIAN_WARMUP}.get(pruner, 1)


class _Writer:
    """What a running trial writes: its per-epoch mean CV scores (Optuna intermediate values) and
    its user attrs, gathered into as few transactions as pruning allows.

    From the first epoch its pruner can act (`prune_from`), each score is written as it comes and
    `should_prune` asked, which reads the study's trials. Before that, and always without a
    pruner, scores wait until `FLUSH_SECONDS` have passed or the trial ends, and go out in the
    same transaction as the attrs written then: the dashboard's curves lag by at most that much,
    and other trials' pruners see them at the latest then."""

    def __init__(self, trial: optuna.Trial, prune_from: int | None) -> None:
        self.trial = trial
        self.prune_from = prune_from
        self.scores: list[tuple[int, float]] = []
        self.attrs: dict[str, Any] = {}
        self.flushed = time.monotonic()

    def epoch(self, epoch: int, value: float) -> None:
        self.scores.append((epoch, value))
        interrupt.check()  # Ctrl-C: between epochs, the trial recorded as interrupted
        prunes = self.prune_from is not None and epoch >= self.prune_from
        if prunes or time.monotonic() - self.flushed >= FLUSH_SECONDS:
            self.flush()
        if prunes and storage.retrying(self.trial.should_prune):
            self.attrs["pruned_at_epoch"] = epoch
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (mean CV score {value:.4f})")

    def flush(self, attrs: dict[str, Any] | None = None) -> None:
        """Write what is pending, and `attrs`, in one transaction (retried if transient)."""
        self.attrs.update(attrs or {})
        scores, pending = self.scores, self.attrs
        if scores or pending:
            storage.retrying(
                lambda: storage.write_trial(self.trial, user_attrs=pending, intermediate=scores)
            )
        self.scores, self.attrs, self.flushed = [], {}, time.monotonic()

    def fail(self, reason: FailReason, error: str) -> None:
        self.flush({"fail_reason": reason, "error": error[-MAX_TRACEBACK_CHARS:]})


class Objective:
    """Callable for `study.optimize`. The K folds are preprocessed once per worker: each fold's
    statistics come from its own training rows, so every trial sees identical folds."""

    def __init__(self, spec: StudySpec, dev: DevSet) -> None:
        self.spec = spec
        self.dev = dev
        self.metric = metrics.get(spec.metric)
        self.folds: list[FoldData] = list(iter_folds(dev))

    def __call__(self, trial: optuna.Trial, attrs: dict[str, Any] | None = None) -> float:
        """Train and score one trial; `attrs` are user attrs to record with its first ones."""
        config = sample_config(trial, self.spec.space)
        seed = engine.derive_seed(self.spec.seed, trial.number)
        n_in = self.folds[0].X_train.shape[1]
        n_out = self.dev.n_classes if self.dev.task == "classification" else 1
        out = _Writer(trial, first_prunable_epoch(self.spec.search.pruner))
        out.flush(
            {
                "config": config.as_dict(),
                "seed": seed,
                "n_params": count_params(config, n_in, n_out),
                **(attrs or {}),
            }
        )
        start = time.perf_counter()
        try:
            result = train(self.spec, self.dev, self.folds, config, seed, on_epoch=out.epoch)
        except optuna.TrialPruned:
            out.flush({"seconds": round(time.perf_counter() - start, 3)})
            raise
        except TrialDiverged as e:
            out.fail("diverged", str(e))
            raise
        except KeyboardInterrupt:
            out.fail("interrupted", "interrupted by the user (Ctrl-C)")
            raise
        except torch.OutOfMemoryError as e:
            out.fail("oom", str(e))
            raise
        except Exception:
            out.fail("exception", traceback.format_exc())
            raise
        self._record(trial, out, result, time.perf_counter() - start)
        return result.value

    def _record(
        self, trial: optuna.Trial, out: _Writer, r: engine.CVResult, seconds: float
    ) -> None:
        best = _study_best(trial.study, r.value)
        attrs: dict[str, Any] = {
            "fold_scores": r.fold_scores,
            "cv_std": r.cv_std,
            "train_score": r.train_score,
            "train_fold_scores": r.train_scores,
            "gap": r.train_score - r.value,
            "best_epoch": r.best_epoch,
            "epochs_run": r.epochs_run,
            "diagnosis": diagnose.fit_label(
                train=r.train_score,
                val=r.value,
                fold_std=r.cv_std,
                study_best=best,
                metric=self.spec.metric,
            ),
            "gradient_health": diagnose.gradient_health(r.grad_norms),
            "grad_norms": [[round(x, 6) for x in e] for e in r.grad_norms],
            "val_curve": r.val_curve,
            "train_loss_curve": r.train_loss_curve,
            "fold_curves": r.fold_curves,
            "fold_seeds": r.seeds,
            "seconds": round(seconds, 3),
        }
        out.flush(attrs)
        notes.annotate_trial(trial, attrs)  # the dashboard note; never raises


def train(
    spec: StudySpec,
    dev: DevSet,
    folds: list[FoldData],
    config: TrialConfig,
    seed: int,
    *,
    on_epoch: engine.EpochCallback | None = None,
) -> engine.CVResult:
    """Cross-validate one config: the one call a trial, and a replay of it, make."""
    return stacked.auto_cross_validate(
        config,
        folds,
        task=dev.task,
        n_classes=dev.n_classes,
        metric=metrics.get(spec.metric),
        training=spec.training,
        seed=seed,
        on_epoch=on_epoch,
    )


def _study_best(study: optuna.Study, current: float) -> float:
    """The best value so far, this trial's included: one indexed query, not a read of every
    trial (every metric is maximized)."""
    try:
        best = storage.retrying(lambda: study.best_value)
    except ValueError:  # no complete trial yet
        return current
    return max(current, best)
