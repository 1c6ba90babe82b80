"""Training: the K fold models of a trial in lock-step, epoch by epoch.

Each epoch every fold trains once on its own shuffled mini-batches (tensor indexing, no DataLoader),
then is scored on its validation rows; the mean validation score is what the pruner and early
stopping watch. The trial's value is the mean score at the best epoch, whose count is kept for the
final refit on all dev rows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from selector.data import FoldData
from selector.errors import TrialDiverged
from selector.metrics import Metric, Task
from selector.model import MLP, build_mlp
from selector.space import TrialConfig
from selector.spec import TrainingSpec

EpochCallback = Callable[[int, float], None]


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed derived from integers (study seed, trial number, fold): never shared."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0] >> 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class CVResult:
    """A trial's cross-validation outcome; curves are per epoch, fold lists per fold."""

    value: float
    best_epoch: int
    epochs_run: int
    fold_scores: list[float]
    train_scores: list[float]
    val_curve: list[float]
    train_loss_curve: list[float]
    fold_curves: list[list[float]]
    grad_norms: list[list[float]]  # per epoch, per layer (input → output), mean over folds
    seeds: list[int]
    stopped_early: bool = False

    @property
    def cv_std(self) -> float:
        return float(np.std(self.fold_scores))

    @property
    def train_score(self) -> float:
        return float(np.mean(self.train_scores))


def make_optimizer(config: TrialConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    lr, wd = config.lr, config.weight_decay
    o = config.optimizer
    if o == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)  # type: ignore[arg-type]
    if o == "momentum":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=config.momentum,  # type: ignore[arg-type]
            nesterov=config.nesterov,
            weight_decay=wd,
        )
    if o == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)  # type: ignore[arg-type]
    if o == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=config.rho, weight_decay=wd)  # type: ignore[arg-type]
    if o == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, rho=config.rho, weight_decay=wd)  # type: ignore[arg-type]
    betas = (config.beta1, config.beta2)
    cls = torch.optim.Adam if o == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]


def make_schedule(
    config: TrialConfig, opt: torch.optim.Optimizer, max_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch learning-rate decay, defined over `max_epochs` so a refit follows the same curve."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, max_epochs // 3), gamma=0.1)
    return None


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Mini-batch slices covering 0..n once; a last batch of one row joins the one before it
    (batch norm cannot train on a single row)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    ends = [*starts[1:], n]
    return list(zip(starts, ends, strict=True))


class FoldRun:
    """One fold's model, optimizer and data on the device."""

    def __init__(
        self,
        config: TrialConfig,
        fold: FoldData,
        *,
        task: Task,
        n_out: int,
        max_epochs: int,
        seed: int,
        device: torch.device,
    ) -> None:
        torch.manual_seed(seed)
        self.model: MLP = build_mlp(config, fold.X_train.shape[1], n_out).to(device)
        self.opt = make_optimizer(config, self.model.parameters())
        self.schedule = make_schedule(config, self.opt, max_epochs)
        self.gen = torch.Generator().manual_seed(seed)
        self.config, self.fold, self.task, self.device = config, fold, task, device
        self.X = torch.as_tensor(fold.X_train, device=device)
        self.y = torch.as_tensor(fold.y_train, device=device)
        self.X_val = torch.as_tensor(fold.X_val, device=device)
        self.loss_fn: nn.Module = (
            nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        )
        self.best_state: dict[str, torch.Tensor] | None = None

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = self.model(xb)
        return self.loss_fn(out.squeeze(-1) if self.task == "regression" else out, yb)  # type: ignore[no-any-return]

    def train_epoch(self) -> tuple[float, list[float]]:
        """One pass over the training rows; returns the mean loss and the first batch's
        per-layer gradient norms."""
        self.model.train()
        n = self.X.shape[0]
        perm = torch.randperm(n, generator=self.gen).to(self.device)
        total = torch.zeros((), device=self.device)
        norms: list[float] = []
        for a, b in batch_bounds(n, self.config.batch_size):
            idx = perm[a:b]
            loss = self._loss(self.X[idx], self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if not norms:
                norms = [float(layer.weight.grad.norm()) for layer in self.model.layers()]  # type: ignore[union-attr]
            if self.config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.opt.step()
            total += loss.detach() * (b - a)
        if self.schedule is not None:
            self.schedule.step()
        return float(total) / n, norms

    def snapshot(self) -> None:
        self.best_state = copy.deepcopy(self.model.state_dict())

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def predict(
    model: nn.Module, X: torch.Tensor, *, task: Task, y_mean: float = 0.0, y_std: float = 1.0
) -> np.ndarray:
    """Class probabilities (float64, rows sum to 1) or target values on the original scale."""
    model.eval()
    with torch.no_grad():
        out = model(X)
    if task == "regression":
        return out.squeeze(-1).double().cpu().numpy() * y_std + y_mean  # type: ignore[no-any-return]
    proba = torch.softmax(out.double(), dim=-1).cpu().numpy()
    return proba / proba.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def score(metric: Metric, y_true: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Score predictions from `predict`; labels are the argmax when the metric needs labels."""
    if metric.needs == "labels":
        return metric.score(y_true, pred.argmax(axis=1), n_classes)
    return metric.score(y_true, pred, n_classes)


@dataclass
class _Curves:
    val: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    folds: list[list[float]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)


class FoldModels(Protocol):
    """A trial's K fold models as the epoch loop (`drive`) sees them: `FoldRuns` here (one fold
    after another) or `selector.stacked.StackedRun` (all folds in one batched model)."""

    def train_epoch(self) -> tuple[list[float], list[list[float]]]:
        """One epoch for every fold: each fold's mean training loss and its first batch's
        per-layer gradient norms."""
        ...

    def predictions(self, which: str = "val") -> list[np.ndarray]:
        """Each fold's `predict` output on its validation (`"val"`) or training rows."""
        ...

    def snapshot(self) -> None: ...

    def restore_best(self) -> None: ...


class FoldRuns:
    """The reference engine: K `FoldRun`s, trained one after another within each epoch."""

    def __init__(self, runs: Sequence[FoldRun]) -> None:
        self.runs = list(runs)

    def train_epoch(self) -> tuple[list[float], list[list[float]]]:
        done = [run.train_epoch() for run in self.runs]
        return [loss for loss, _ in done], [norms for _, norms in done]

    def predictions(self, which: str = "val") -> list[np.ndarray]:
        return [
            predict(
                run.model,
                run.X_val if which == "val" else run.X,
                task=run.task,
                y_mean=run.fold.y_mean,
                y_std=run.fold.y_std,
            )
            for run in self.runs
        ]

    def snapshot(self) -> None:
        for run in self.runs:
            run.snapshot()

    def restore_best(self) -> None:
        for run in self.runs:
            run.restore_best()


def drive(
    models: FoldModels,
    folds: Sequence[FoldData],
    *,
    task: Task,
    n_classes: int,
    metric: Metric,
    training: TrainingSpec,
    seeds: list[int],
    on_epoch: EpochCallback | None = None,
) -> CVResult:
    """The epoch loop both engines share: train every fold, stop on a non-finite loss, score the
    folds, keep the best epoch's snapshot, report to `on_epoch` (which may raise to prune), stop
    after `patience` epochs without a better mean; then the train scores at the best epoch."""
    curves = _Curves()
    best, best_epoch, best_scores = -math.inf, 0, [0.0] * len(folds)
    for epoch in range(1, training.max_epochs + 1):
        losses, norms = models.train_epoch()
        for k, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise TrialDiverged(epoch, k)
        scores = [
            score(metric, f.y_val, pred, n_classes)
            for f, pred in zip(folds, models.predictions("val"), strict=True)
        ]
        mean = float(np.mean(scores))
        curves.val.append(mean)
        curves.loss.append(float(np.mean(losses)))
        curves.folds.append(scores)
        curves.grads.append(np.mean(np.asarray(norms), axis=0).tolist())
        if mean > best:
            best, best_epoch, best_scores = mean, epoch, scores
            models.snapshot()
        if on_epoch is not None:
            on_epoch(epoch, mean)
        if epoch - best_epoch >= training.patience:
            break
    models.restore_best()  # the train score, for the generalization gap, at the best epoch
    train_scores = []
    for f, pred in zip(folds, models.predictions("train"), strict=True):
        y = f.y_train * f.y_std + f.y_mean if task == "regression" else f.y_train
        train_scores.append(score(metric, y, pred, n_classes))
    return CVResult(
        value=best,
        best_epoch=best_epoch,
        epochs_run=len(curves.val),
        fold_scores=best_scores,
        train_scores=train_scores,
        val_curve=curves.val,
        train_loss_curve=curves.loss,
        fold_curves=[list(c) for c in zip(*curves.folds, strict=True)],
        grad_norms=curves.grads,
        seeds=seeds,
        stopped_early=len(curves.val) < training.max_epochs,
    )


@dataclass(frozen=True)
class Setup:
    """What building a trial's K fold models takes besides its config and folds: each fold's
    seed (its initial weights and batches), and the seed of dropout draws that do not come from
    torch's global generator."""

    task: Task
    n_out: int
    max_epochs: int
    seeds: list[int]
    device: torch.device
    dropout_seed: int


BuildModels = Callable[[TrialConfig, Sequence[FoldData], Setup], FoldModels]


def reference_models(config: TrialConfig, folds: Sequence[FoldData], setup: Setup) -> FoldRuns:
    """The reference engine's models: one `FoldRun` per fold (dropout from torch's generator)."""
    return FoldRuns(
        [
            FoldRun(
                config,
                f,
                task=setup.task,
                n_out=setup.n_out,
                max_epochs=setup.max_epochs,
                seed=s,
                device=setup.device,
            )
            for f, s in zip(folds, setup.seeds, strict=True)
        ]
    )


def cross_validate(
    config: TrialConfig,
    folds: Sequence[FoldData],
    *,
    task: Task,
    n_classes: int,
    metric: Metric,
    training: TrainingSpec,
    seed: int,
    on_epoch: EpochCallback | None = None,
    build: BuildModels = reference_models,
) -> CVResult:
    """Cross-validate `config` on `folds` with the models `build` makes (by default the reference
    engine's); `on_epoch(epoch, mean_val_score)` may raise to prune."""
    setup = Setup(
        task=task,
        n_out=n_classes if task == "classification" else 1,
        max_epochs=training.max_epochs,
        seeds=[derive_seed(seed, k) for k in range(len(folds))],
        device=resolve_device(training.device),
        dropout_seed=derive_seed(seed, len(folds)),
    )
    models = build(config, folds, setup)
    torch.manual_seed(setup.dropout_seed)  # dropout masks drawn from torch's generator
    return drive(
        models,
        folds,
        task=task,
        n_classes=n_classes,
        metric=metric,
        training=training,
        seeds=setup.seeds,
        on_epoch=on_epoch,
    )


def fit(
    config: TrialConfig,
    fold: FoldData,
    *,
    task: Task,
    n_classes: int,
    epochs: int,
    max_epochs: int,
    seed: int,
    device: str = "auto",
) -> MLP:
    """Train one model on `fold`'s training rows for exactly `epochs` epochs (the final refit)."""
    n_out = n_classes if task == "classification" else 1
    run = FoldRun(
        config,
        fold,
        task=task,
        n_out=n_out,
        max_epochs=max_epochs,
        seed=seed,
        device=resolve_device(device),
    )
    torch.manual_seed(derive_seed(seed, 1))
    for epoch in range(1, epochs + 1):
        loss, _ = run.train_epoch()
        if not math.isfinite(loss):
            raise TrialDiverged(epoch, 0)
    run.model.eval()
    return run.model
