"""Training: the K fold models of a trial in lock-step, epoch by epoch.

Each epoch every fold trains once on its own shuffled mini-batches (tensor indexing, no DataLoader),
then is scored on its validation rows; the mean validation score is what the pruner and early
stopping watch. The trial's value is the mean score at the best epoch, whose count is kept for the
final refit on all dev rows.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from selector.data import FoldData
from selector.errors import TrialDiverged, TrialOutOfMemory
from selector.metrics import Metric, Task
from selector.model import MLP, build_mlp, count_params
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
    # each fold's `predict` output on its validation rows at the best epoch (out-of-fold)
    oof: list[np.ndarray] = field(default_factory=list)

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
    return metric.of_predictions(y_true, pred, n_classes)


def score_rows(
    metric: Metric, y_true: np.ndarray, preds: Sequence[np.ndarray], n_classes: int
) -> list[float]:
    """`score` of each of several models' predictions of the same rows, computed together
    where the metric allows (`Metric.of_prediction_rows`): the same floats."""
    if not preds:
        return []
    return metric.of_prediction_rows(y_true, np.stack(preds), n_classes)


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


def stops(epoch: int, best_epoch: int, best: float, metric: Metric, training: TrainingSpec) -> bool:
    """Whether a trial's training ends after `epoch` (its best mean CV score `best`, first
    reached at `best_epoch`): `patience` epochs without a better mean, or a perfect mean
    (`Metric.perfect`), which no later epoch can beat: only a strictly better mean replaces
    the best epoch, so the result is the one training on would give, without the epochs that
    cannot change it (on penguins, a quarter of all epochs trained came after a trial's perfect
    score). The last epoch (`max_epochs`) ends it too."""
    return (
        epoch - best_epoch >= training.patience
        or best >= metric.perfect
        or epoch >= training.max_epochs
    )


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
    after `patience` epochs without a better mean, or at once where the mean is perfect
    (`stops`); then the train scores at the best epoch."""
    curves = _Curves()
    best, best_epoch, best_scores = -math.inf, 0, [0.0] * len(folds)
    best_preds: list[np.ndarray] = []
    for epoch in range(1, training.max_epochs + 1):
        losses, norms = models.train_epoch()
        for k, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise TrialDiverged(epoch, k)
        preds = models.predictions("val")
        scores = [
            score(metric, f.y_val, pred, n_classes) for f, pred in zip(folds, preds, strict=True)
        ]
        mean = float(np.mean(scores))
        curves.val.append(mean)
        curves.loss.append(float(np.mean(losses)))
        curves.folds.append(scores)
        curves.grads.append(np.mean(np.asarray(norms), axis=0).tolist())
        if mean > best:
            best, best_epoch, best_scores, best_preds = mean, epoch, scores, preds
            models.snapshot()
        if on_epoch is not None:
            on_epoch(epoch, mean)
        if stops(epoch, best_epoch, best, metric, training):
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
        oof=best_preds,
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
    on_epoch: Callable[[int], None] | None = None,
) -> MLP:
    """Train one model on `fold`'s training rows for exactly `epochs` epochs (the final refit);
    `on_epoch(epoch)` after each, for the progress a person waits on."""
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
        if on_epoch is not None:
            on_epoch(epoch)
    run.model.eval()
    return run.model


# --- memory: what a trial needs, what the machine has, and what failed for want of it -------------

# Per-parameter tensors each optimizer keeps besides the weights and their gradients.
OPTIMIZER_STATES = {
    "sgd": 0,
    "momentum": 1,
    "adagrad": 1,
    "rmsprop": 1,
    "adadelta": 2,
    "adam": 2,
    "adamw": 2,
}
# Share of the available memory the reference engine may plan to use before a trial is refused:
# the estimate leaves out the interpreter, torch's workspaces and fragmentation.
REFERENCE_SHARE = 0.9
# What an allocation failure says: torch's CPU allocator, CUDA, MPS, cuBLAS, the C++ runtime.
OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
    "alloc_failed",
    "bad_alloc",
)


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes an engine needs at its peak for one trial, by what drives each part: the data
    (rows, features, folds), the weights with their gradients, optimizer state and best-epoch
    snapshot (width, depth), one training batch's activations (batch size, width) and one
    evaluation's (rows, width)."""

    data: int
    weights: int
    batch: int
    evaluation: int

    @property
    def total(self) -> int:
        return self.data + self.weights + self.batch + self.evaluation


def reference_need(
    config: TrialConfig,
    *,
    folds: int,
    n_in: int,
    n_train: int,
    n_val: int,
    n_out: int,
    copies_data: bool,
) -> MemoryNeed:
    """The reference engine's peak: all `folds` fold models are built at once (`reference_models`)
    and each keeps its weights, gradients, optimizer state and snapshot; the folds train and are
    scored one after another, each evaluation on all of a fold's rows in one pass. The data are
    copied only onto another device (on the CPU the tensors share the folds' arrays)."""
    widths = config.widths()
    params = count_params(config, n_in, n_out)
    copies = 3 + OPTIMIZER_STATES.get(config.optimizer, 2)  # weights, grads, snapshot, states
    per_row = n_in + 6 * sum(widths) + 2 * n_out  # as `stacked.memory_estimate` counts a step
    rows = max(n_train, n_val)
    return MemoryNeed(
        data=folds * (n_train + n_val) * (n_in + 1) * 4 if copies_data else 0,
        # plus the temporaries of the fold being stepped (a foreach optimizer's, about 2 copies)
        weights=(folds * copies + 2) * params * 4,
        batch=min(config.batch_size, n_train) * per_row * 4 * 2,
        evaluation=rows * (n_in + 3 * max(widths) + n_out) * 4 + rows * n_out * 8 * 2,
    )


def fold_shape(folds: Sequence[FoldData], n_out: int) -> dict[str, int]:
    """What the memory estimates need of a trial's folds: their count, the features, the
    largest training and validation parts, the outputs."""
    return {
        "folds": len(folds),
        "n_in": folds[0].X_train.shape[1],
        "n_train": max(f.X_train.shape[0] for f in folds),
        "n_val": max(f.X_val.shape[0] for f in folds),
        "n_out": n_out,
    }


def reference_memory(
    folds: Sequence[FoldData], config: TrialConfig, n_out: int, device: torch.device
) -> MemoryNeed:
    """`reference_need` for these folds on `device`."""
    return reference_need(config, copies_data=device.type != "cpu", **fold_shape(folds, n_out))


def available_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on `device`. On CUDA the device's free memory plus
    what torch's caching allocator holds unused; on the CPU the kernel's MemAvailable (psutil's,
    or free pages, where /proc is not there), capped by a container's cgroup memory limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    return min(_host_available(), _cgroup_available())


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# cgroup v2, then v1: (limit file, usage file, the reclaimable page cache's key in memory.stat)
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "total_inactive_file",
    ),
)
UNLIMITED = 1 << 62


def _cgroup_available() -> int:
    """Bytes left under this container's memory limit (UNLIMITED where none is set): past it
    the kernel's OOM killer ends the process instead of an allocation failing."""
    for limit_file, usage_file, cache_key in CGROUP_FILES:
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
            if text == "max":
                return UNLIMITED
            limit = int(text)
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
            with open(os.path.join(os.path.dirname(limit_file), "memory.stat")) as fh:
                stat = dict(line.split() for line in fh if line.count(" ") == 1)
        except (OSError, ValueError):
            continue
        if limit >= UNLIMITED:
            return UNLIMITED
        return max(0, limit - usage + int(stat.get(cache_key, 0)))
    return UNLIMITED


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` means the trial ran out of memory: torch's `OutOfMemoryError` (CUDA),
    `MemoryError` (NumPy, Python), `TrialOutOfMemory` (refused by the estimate) and the
    `RuntimeError` of a failed allocation elsewhere (the CPU allocator's "DefaultCPUAllocator:
    can't allocate memory" or "not enough memory", MPS, cuBLAS)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError | TrialOutOfMemory):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in OOM_MESSAGES)


def out_of_memory(
    config: TrialConfig, need: MemoryNeed, available: int, device: torch.device, folds: int
) -> TrialOutOfMemory:
    """The refusal of a trial that cannot fit, naming the knob that drives the largest part."""
    parts = {
        "weights": (need.weights, "width or depth"),
        "batch": (need.batch, "batch size or width"),
        "evaluation": (need.evaluation, "width"),
        "data": (need.data, "the folds or the rows"),
    }
    knob = max(parts.values())[1]
    return TrialOutOfMemory(
        f"needs about {_size(need.total)} on {device.type} but {_size(available)} is available "
        f"(width {config.width}, depth {config.depth}, batch size {config.batch_size}, "
        f"{config.optimizer}, {folds} folds): weights {_size(need.weights, False)}, "
        f"a batch's activations {_size(need.batch, False)}, an evaluation "
        f"{_size(need.evaluation, False)}, data {_size(need.data, False)}; lower the {knob}",
        need=need.total,
        available=available,
    )


def _size(n: int, exact: bool = True) -> str:
    shown = f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    return f"{shown} ({n:,} bytes)" if exact else shown
