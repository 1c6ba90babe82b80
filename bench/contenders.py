"""The four ways to score one config, and the workloads they are timed on."""

from __future__ import annotations

import gc
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from selector import data, engine, metrics, spec, stacked
from selector.data import FoldData
from selector.space import TrialConfig
from selector.spec import TrainingSpec


@dataclass(frozen=True)
class Workload:
    """One data set, cut into folds twice: raw (for scikit-learn's own pipeline) and prepared."""

    name: str
    X: np.ndarray  # raw features, float32, the rows the folds index
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]
    folds: list[FoldData]
    n_classes: int
    config: TrialConfig
    epochs: int

    def flops(self) -> float:
        """Arithmetic of one selector trial: multiply-adds of the linear layers, forward and
        backward (no input gradient for the first layer), one validation pass per epoch and the
        final pass over the training rows (the train score). Used for every contender."""
        widths = self.config.widths()
        ins = [self.X.shape[1], *widths]
        outs = [*widths, self.n_classes]
        macs = sum(i * o for i, o in zip(ins, outs, strict=True))
        first = ins[0] * outs[0]
        train_rows = sum(f.X_train.shape[0] for f in self.folds)
        val_rows = sum(f.X_val.shape[0] for f in self.folds)
        per_epoch = train_rows * (6 * macs - 2 * first) + val_rows * 2 * macs
        return float(self.epochs * per_epoch + train_rows * 2 * macs)


NETWORK = TrialConfig(
    depth=3,
    width=256,
    activation="relu",
    dropout=0.2,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.01,
    batch_size=128,
)


def digits(epochs: int = 20) -> Workload:
    s = spec.parse(
        {
            "name": "bench-digits",
            "metric": "accuracy",
            "data": {"source": "sklearn:digits"},
            "cv": {"folds": 5},
        },
        origin="bench",
    )
    dev = data.dev_set(data.prepare(s))
    X = dev.X.to_numpy(dtype=np.float32)
    return Workload(
        name="digits",
        X=X,
        y=np.asarray(dev.y),
        splits=[(tr, va) for tr, va in dev.folds],
        folds=list(data.iter_folds(dev)),
        n_classes=dev.n_classes,
        config=NETWORK,
        epochs=epochs,
    )


def synthetic(rows: int = 50_000, features: int = 100, epochs: int = 5) -> Workload:
    X, y = make_classification(
        n_samples=rows,
        n_features=features,
        n_informative=20,
        n_redundant=10,
        n_classes=5,
        random_state=0,
    )
    X = X.astype(np.float32)
    splits = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))
    folds = []
    for tr, va in splits:
        scaler = StandardScaler().fit(X[tr])
        folds.append(
            FoldData(
                scaler.transform(X[tr]).astype(np.float32),
                y[tr].astype(np.int64),
                scaler.transform(X[va]).astype(np.float32),
                y[va].astype(np.int64),
            )
        )
    return Workload(
        name=f"make_classification {rows} x {features}",
        X=X,
        y=y,
        splits=splits,
        folds=folds,
        n_classes=5,
        config=NETWORK,
        epochs=epochs,
    )


# --- the contenders: each returns the mean CV accuracy after the last epoch ---------------------

# Where the torch contenders train: "cpu" or "cuda" (`python -m bench --device`). scikit-learn's
# MLPClassifier has no GPU path and always runs on the CPU.
DEVICE = "cpu"


def typical_script(w: Workload, seed: int = 0) -> float:
    """What a practitioner writes: an Optuna objective, a DataLoader per fold, folds in turn."""

    dev = torch.device(DEVICE)

    def objective(trial: optuna.Trial) -> float:
        width = trial.suggest_categorical("width", [w.config.width])
        depth = trial.suggest_int("depth", w.config.depth, w.config.depth)
        p = trial.suggest_float("dropout", w.config.dropout, w.config.dropout)
        lr = trial.suggest_float("lr", w.config.lr, w.config.lr, log=True)
        scores = []
        for k, fold in enumerate(w.folds):
            torch.manual_seed(seed + k)
            layers: list[nn.Module] = []
            n_in = fold.X_train.shape[1]
            for _ in range(depth):
                layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(p)]
                n_in = width
            model = nn.Sequential(*layers, nn.Linear(n_in, w.n_classes)).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=w.config.weight_decay)
            train = TensorDataset(torch.from_numpy(fold.X_train), torch.from_numpy(fold.y_train))
            loader = DataLoader(train, batch_size=w.config.batch_size, shuffle=True)
            for _ in range(w.epochs):
                model.train()
                for xb, yb in loader:
                    xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    opt.step()
            model.eval()
            with torch.no_grad():
                pred = model(torch.from_numpy(fold.X_val).to(dev)).argmax(1).cpu().numpy()
            scores.append(float((pred == fold.y_val).mean()))
            trial.report(float(np.mean(scores)), k)
        return float(np.mean(scores))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed))
    study.optimize(objective, n_trials=1)
    return float(study.best_value)


def sklearn_mlp(w: Workload, seed: int = 0) -> float:
    """MLPClassifier, same layers, Adam with L2 (it has no dropout), float32 input."""
    mlp = MLPClassifier(
        hidden_layer_sizes=(w.config.width,) * w.config.depth,
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=w.config.batch_size,
        learning_rate_init=w.config.lr,
        max_iter=w.epochs,
        shuffle=True,
        tol=0.0,
        n_iter_no_change=w.epochs + 1,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(
            make_pipeline(StandardScaler(), mlp), w.X, w.y, cv=w.splits, scoring="accuracy"
        )
    return float(np.mean(scores))


def _selector(fn: stacked.CrossValidate) -> Callable[[Workload, int], float]:
    def run(w: Workload, seed: int = 0) -> float:
        result = fn(
            w.config,
            w.folds,
            task="classification",
            n_classes=w.n_classes,
            metric=metrics.get("accuracy"),
            training=TrainingSpec(max_epochs=w.epochs, patience=w.epochs + 1, device=DEVICE),  # type: ignore[arg-type]
            seed=seed,
        )
        return result.val_curve[-1]

    return run


CONTENDERS: dict[str, Callable[[Workload, int], float]] = {
    "(a) Optuna + DataLoader, folds in turn": typical_script,
    "(b) sklearn MLPClassifier, cross_val_score": sklearn_mlp,
    "(c) selector reference engine": _selector(engine.cross_validate),
    "(d) selector stacked engine": _selector(stacked.cross_validate),
}


def worker(threads: int, epochs: int, barrier: Any, queue: Any) -> None:
    """One worker process of the cores table: warm up, wait for the others, time one trial."""
    torch.set_num_threads(threads)
    w = digits(epochs)
    run = CONTENDERS["(d) selector stacked engine"]
    run(Workload(w.name, w.X, w.y, w.splits, w.folds, w.n_classes, w.config, 1), 0)
    barrier.wait()
    t = time.perf_counter()
    run(w, 0)
    queue.put(time.perf_counter() - t)


# --- the machine ------------------------------------------------------------------------------


def matmul_gflops(n: int = 2048, seconds: float = 1.0) -> float:
    """Best float32 matmul rate of an n x n x n product at the current thread count, on `DEVICE`
    (on a GPU: 8192^3, timed over 10 products between synchronisations)."""
    cuda = DEVICE == "cuda"
    if cuda:
        n = 8192
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    out = torch.empty(n, n, device=DEVICE)
    reps = 10 if cuda else 1
    torch.matmul(a, b, out=out)
    best = math.inf
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync()
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        _sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best / 1e9


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --- peak memory ------------------------------------------------------------------------------


def _rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_torch(device: str) -> None:
    """One tiny training step, so that torch's one-off costs (thread pools, kernels, the CUDA
    context) are not charged to the contender measured next."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(device)
    opt = torch.optim.AdamW(model.parameters())
    F.cross_entropy(
        model(torch.randn(4, 8, device=device)), torch.zeros(4, dtype=torch.int64, device=device)
    ).backward()
    opt.step()


def peak_memory(workload: str, name: str, device: str, threads: int, queue: Any) -> None:
    """Child process of the memory table: the memory one run of contender `name` (1 epoch) adds to
    the process once the workload is loaded. On the CPU the peak resident set, sampled every
    millisecond, over the resident set before the run; on a GPU the allocator's peak."""
    global DEVICE
    DEVICE = device
    torch.set_num_threads(threads)
    w = digits(1) if workload == "digits" else synthetic(epochs=1)
    _warm_torch(device)
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    gc.collect()
    before = _rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    CONTENDERS[name](w, 0)
    done.set()
    sampler.join()
    peak = max(peak, _rss())
    gpu = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    queue.put((peak - before, gpu))


# --- baddbmm against torch.func.vmap + functional_call ----------------------------------------


def step_times(
    config: TrialConfig, n_in: int, n_out: int, folds: int = 5, steps: int = 10, rounds: int = 5
) -> dict[str, float]:
    """Milliseconds per training step (forward, backward, AdamW) of K stacked models, two ways."""
    from selector.model import build_mlp

    B = config.batch_size
    x = torch.randn(folds, B, n_in)
    y = torch.randint(0, n_out, (folds, B))
    seeds = list(range(folds))

    model = stacked.StackedMLP(config, n_in, n_out, seeds, torch.device("cpu"))
    opt = stacked.stacked_optimizer(config, model.parameters())

    def baddbmm_step() -> None:
        out = model.forward(x.transpose(1, 2), train=True)
        loss = F.cross_entropy(out, y, reduction="none").mean(1).sum()
        for p in model.parameters():
            p.grad = None
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(build_mlp(config, n_in, n_out))
    params, buffers = torch.func.stack_module_state(models)  # type: ignore[no-untyped-call]
    base = build_mlp(config, n_in, n_out).to("meta")
    vopt = stacked.stacked_optimizer(config, list(params.values()))

    def call(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor
    ) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (xb,))  # type: ignore[no-any-return]

    batched = torch.func.vmap(call, randomness="different")

    def vmap_step() -> None:
        out = batched(params, buffers, x)  # (K, B, n_out)
        loss = F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1).sum()
        for p in params.values():
            p.grad = None
        loss.backward()  # type: ignore[no-untyped-call]
        vopt.step()

    contenders = (("baddbmm", baddbmm_step), ("vmap", vmap_step))
    for _, step in contenders:
        for _ in range(3):
            step()
    times = {name: math.inf for name, _ in contenders}
    for _ in range(rounds):  # alternate, keep each one's best round
        for name, step in contenders:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[name] = min(times[name], (time.perf_counter() - t) / steps * 1e3)
    return times
