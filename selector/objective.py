"""One trial: config → K-fold training → per-epoch reports and pruning → user attrs."""

from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
import optuna
import torch

from selector import diagnose, engine, metrics, notes, stacked, storage
from selector.data import DevSet, FoldData, iter_folds
from selector.errors import FailReason, TrialDiverged
from selector.model import count_params
from selector.space import TrialConfig, sample_config
from selector.spec import StudySpec

MAX_TRACEBACK_CHARS = 4000


def _set(trial: optuna.Trial, key: str, value: Any) -> None:
    """A user attr, written through transient database errors."""
    storage.retrying(lambda: trial.set_user_attr(key, value))


def _fail(trial: optuna.Trial, reason: FailReason, error: str) -> None:
    _set(trial, "fail_reason", reason)
    _set(trial, "error", error[-MAX_TRACEBACK_CHARS:])


class Objective:
    """Callable for `study.optimize`. The K folds are preprocessed once per worker: each fold's
    statistics come from its own training rows, so every trial sees identical folds."""

    def __init__(self, spec: StudySpec, dev: DevSet) -> None:
        self.spec = spec
        self.dev = dev
        self.metric = metrics.get(spec.metric)
        self.folds: list[FoldData] = list(iter_folds(dev))

    def __call__(self, trial: optuna.Trial) -> float:
        config = sample_config(trial, self.spec.space)
        seed = engine.derive_seed(self.spec.seed, trial.number)
        _set(trial, "config", config.as_dict())
        _set(trial, "seed", seed)
        n_in = self.folds[0].X_train.shape[1]
        n_out = self.dev.n_classes if self.dev.task == "classification" else 1
        _set(trial, "n_params", count_params(config, n_in, n_out))
        start = time.perf_counter()
        try:
            result = self._train(trial, config, seed)
        except optuna.TrialPruned:
            _set(trial, "seconds", round(time.perf_counter() - start, 3))
            raise
        except TrialDiverged as e:
            _fail(trial, "diverged", str(e))
            raise
        except KeyboardInterrupt:
            _fail(trial, "interrupted", "interrupted by the user (Ctrl-C)")
            raise
        except torch.OutOfMemoryError as e:
            _fail(trial, "oom", str(e))
            raise
        except Exception:
            _fail(trial, "exception", traceback.format_exc())
            raise
        self._record(trial, result, time.perf_counter() - start)
        return result.value

    def _train(self, trial: optuna.Trial, config: TrialConfig, seed: int) -> engine.CVResult:
        def on_epoch(epoch: int, value: float) -> None:
            storage.retrying(lambda: trial.report(value, epoch))
            if storage.retrying(trial.should_prune):
                _set(trial, "pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (mean CV score {value:.4f})")

        return train(self.spec, self.dev, self.folds, config, seed, on_epoch=on_epoch)

    def _record(self, trial: optuna.Trial, r: engine.CVResult, seconds: float) -> None:
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
        for key, value in attrs.items():
            _set(trial, key, value)
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
    values = [
        t.value
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ]
    return float(np.max([current, *[v for v in values if v is not None]]))
