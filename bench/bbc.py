"""`python -m bench.bbc [--quick]`: is BBC-CV closer to the held-out test score than the raw best CV?

On each data set (half its rows held out as the test set, 5 folds over the rest) N configs are
drawn at random from the study file's search space and cross-validated; their out-of-fold
predictions give the raw best CV score (the best candidate's score on all dev rows: optimistic,
being a maximum) and the BBC-CV estimate of selecting that way (`selector.estimate.bbc_cv`). The
chosen config is then refit on all dev rows for its best epoch and scored once on the test rows,
as `selector.final` does. The shuffled variant permutes the target within the dev rows and within
the test rows: nothing can be learnt, so the test score sits at chance and any raw CV above it is
selection bias. (The test target is permuted too because an untrained network already ranks
breast_cancer's true test labels with a ROC AUC near 0.97 or 0.03: its features are so correlated
that any random projection is close to their first principal component.)

Tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch

from selector import data, engine, estimate, final, metrics, objective, spec, worker
from selector.data import DevSet, Part
from selector.errors import TrialDiverged
from selector.estimate import Candidate, Estimate
from selector.model import count_params
from selector.space import TrialConfig, sample_config

STUDIES = Path(__file__).resolve().parents[1] / "studies"

# (row label, study file, shuffle the dev target)
SETS = [
    ("breast_cancer", "breast_cancer.toml", False),
    ("wine", "wine.toml", False),
    ("penguins", "penguins.toml", False),
    ("digits", "digits.toml", False),
    ("breast_cancer shuffled", "breast_cancer.toml", True),
]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True)
class Row:
    name: str
    metric: str
    configs: int
    est: Estimate
    test: float
    bbc_seconds: float
    load: str


def bench_spec(file: str, epochs: int) -> spec.StudySpec:
    """The study file with the bench's split, folds and training budget."""
    base = spec.load(STUDIES / file)
    raw = {
        **base.raw,
        "data": {**base.raw["data"], "test_size": 0.5},
        "cv": {"folds": 5, "repeats": 1},
        "training": {"max_epochs": epochs, "patience": max(3, epochs // 3), "device": "cpu"},
        "search": {"sampler": "random", "pruner": "none"},
    }
    return spec.parse(raw, origin=f"bench:{file}", base_dir=base.base_dir)


def shuffled(dev: DevSet, test: Part, seed: int) -> tuple[DevSet, Part]:
    """Dev and test sets with the target permuted within each (folds and features unchanged)."""
    rng = np.random.default_rng(seed)
    return (
        dataclasses.replace(dev, y=rng.permutation(dev.y)),
        dataclasses.replace(test, y=rng.permutation(test.y)),
    )


def sample_configs(s: spec.StudySpec, n: int) -> list[tuple[int, TrialConfig]]:
    """N configs from the study's space by Optuna's RandomSampler, with their trial numbers."""
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=s.seed)
    )
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial.number, sample_config(trial, s.space)))
        study.tell(trial, 0.0)
    return out


def out_of_fold(dev: DevSet, result: engine.CVResult) -> np.ndarray:
    """The folds' out-of-fold predictions put back in dev-row order."""
    first = result.oof[0]
    oof = np.empty((len(dev.y), *first.shape[1:]), dtype=np.float64)
    for (_, val), pred in zip(dev.folds, result.oof, strict=True):
        oof[val] = pred
    return oof


def fold_of_row(dev: DevSet) -> np.ndarray:
    fold = np.full(len(dev.y), -1, dtype=np.int64)
    for k, (_, val) in enumerate(dev.folds):
        fold[val] = k
    return fold


def candidates(
    s: spec.StudySpec, dev: DevSet, configs: list[tuple[int, TrialConfig]], label: str
) -> tuple[list[Candidate], dict[int, TrialConfig]]:
    """Cross-validate each config as a trial does; diverged configs are left out."""
    folds = list(data.iter_folds(dev))
    n_in = folds[0].X_train.shape[1]
    n_out = dev.n_classes if dev.task == "classification" else 1
    out, by_trial = [], {}
    for i, (number, config) in enumerate(configs, 1):
        start = time.perf_counter()
        try:
            r = objective.train(s, dev, folds, config, engine.derive_seed(s.seed, number))
        except TrialDiverged as e:
            print(f"  {label} {i}/{len(configs)}: diverged ({e})", file=sys.stderr, flush=True)
            continue
        out.append(
            Candidate(number, out_of_fold(dev, r), count_params(config, n_in, n_out), r.best_epoch)
        )
        by_trial[number] = config
        print(
            f"  {label} {i}/{len(configs)}: CV {r.value:.4f} at epoch {r.best_epoch} "
            f"({time.perf_counter() - start:.1f} s, load {_load()})",
            file=sys.stderr,
            flush=True,
        )
    return out, by_trial


def refit_and_score(
    s: spec.StudySpec, dev: DevSet, test: Part, config: TrialConfig, epochs: int
) -> float:
    """`final._refit_and_score`'s refit: all dev rows, `epochs` epochs, the final seed; then the
    test rows scored once."""
    _, (x_dev, x_test) = data.fit_transform(dev.X, test.X)
    model, mean, std = final.refit(
        s, config, x_dev, dev.y, task=dev.task, n_classes=dev.n_classes, epochs=epochs
    )
    x = torch.as_tensor(x_test, device=next(model.parameters()).device)
    pred = engine.predict(model, x, task=dev.task, y_mean=mean, y_std=std)
    return engine.score(metrics.get(s.metric), test.y, pred, dev.n_classes)


def run_set(label: str, file: str, shuffle: bool, n_configs: int, epochs: int, boot: int) -> Row:
    s = bench_spec(file, epochs)
    prep = data.prepare(s)
    dev, test = data.dev_set(prep), data.test_set(prep)
    if shuffle:
        dev, test = shuffled(dev, test, s.seed)
    cands, configs = candidates(s, dev, sample_configs(s, n_configs), label)
    start = time.perf_counter()
    est = estimate.bbc_cv(cands, dev.y, fold_of_row(dev), s.metric, n_boot=boot, seed=s.seed)
    seconds = time.perf_counter() - start
    chosen = next(c for c in cands if c.trial == est.chosen)
    test_score = refit_and_score(s, dev, test, configs[est.chosen], chosen.best_epoch)
    print(
        f"  {label}: raw {est.raw_best:.4f}, BBC {est.value:.4f}, test {test_score:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return Row(label, s.metric, len(cands), est, test_score, seconds, _load())


def timing(n: int = 1500, c: int = 100, boot: int = 1000, repeats: int = 5) -> dict[str, float]:
    """Seconds of `bbc_cv` (median of `repeats`) on synthetic accuracy data of the target size."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    cands = [
        Candidate(i, np.where(rng.random(n) < 0.8, y, 1 - y), int(rng.integers(100, 10_000)), 10)
        for i in range(c)
    ]
    fold = np.arange(n) % 5
    out = {}
    for rule in estimate.RULES:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            estimate.bbc_cv(cands, y, fold, "accuracy", rule=rule, n_boot=boot)
            times.append(time.perf_counter() - t)
        out[rule] = float(np.median(times))
    return out


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'data set':24s} {'metric':18s} {'configs':>7s} {'raw best CV':>11s} "
        f"{'BBC-CV [90% interval]':>30s} {'test':>8s} {'|raw-test|':>10s} {'|BBC-test|':>10s} "
        f"{'B':>5s} {'BBC s':>6s}  load (1/5/15 min)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        e = r.est
        interval = f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]"
        print(
            f"{r.name:24s} {r.metric:18s} {r.configs:7d} {e.raw_best:11.4f} {interval:>30s} "
            f"{r.test:8.4f} {abs(e.raw_best - r.test):10.4f} {abs(e.value - r.test):10.4f} "
            f"{e.n_boot:5d} {r.bbc_seconds:6.2f}  {r.load}"
        )
    raw_err = float(np.mean([abs(r.est.raw_best - r.test) for r in rows]))
    bbc_err = float(np.mean([abs(r.est.value - r.test) for r in rows]))
    covered = sum(r.est.low <= r.test <= r.est.high for r in rows)
    print(
        f"mean |raw-test| {raw_err:.4f}, mean |BBC-test| {bbc_err:.4f} "
        f"(ratio {raw_err / max(bbc_err, 1e-12):.2f}x); test inside the 90% interval: "
        f"{covered}/{len(rows)}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bbc", description=__doc__)
    ap.add_argument("--configs", type=int, default=40, help="random configs per data set")
    ap.add_argument("--epochs", type=int, default=20, help="max epochs of a config")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap samples")
    ap.add_argument("--quick", action="store_true", help="6 configs of 4 epochs (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs, args.epochs = 6, 4
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = worker.torch_threads(1)
    torch.set_num_threads(threads)
    print(
        f"bench.bbc {dt.date.today()}: torch {torch.__version__}, {threads} threads, "
        f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}, load {_load()}; "
        f"{args.configs} random configs, <= {args.epochs} epochs, {args.boot} bootstraps, "
        "test_size 0.5, 5 folds, rule best"
    )
    t = timing()
    print(
        "bbc_cv on C=100 candidates, n=1500 rows, B=1000, accuracy (median of 5): "
        + ", ".join(f"{rule} {s * 1000:.0f} ms" for rule, s in t.items())
    )
    start = time.perf_counter()
    rows = [
        run_set(label, file, shuffle, args.configs, args.epochs, args.boot)
        for label, file, shuffle in SETS
    ]
    print()
    print_table(rows)
    print(
        f"\n{time.perf_counter() - start:.0f} s in all; load average at the end: {_load()} "
        "(numbers from a busy machine are not comparable)"
    )


if __name__ == "__main__":
    main()
