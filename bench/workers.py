"""`python -m bench.workers`: study throughput with 2 local workers against 1, on this machine.

Each contender runs the same small digits study from a fresh SQLite file in a fresh process
(`selector run --workers N`); throughput is finished trials per second between the first trial's
start and the last trial's end, read from the database, so process start-up is not counted.
Contenders alternate; the table shows medians and the ratio to one worker measured in this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import tomli_w

STUDY = {
    "name": "bench-workers",
    "metric": "accuracy",
    "n_trials": 12,
    "seed": 0,
    "data": {"source": "sklearn:digits"},
    "cv": {"folds": 5},
    "training": {"max_epochs": 6, "patience": 6, "device": "cpu"},
    "search": {"sampler": "random", "pruner": "none"},
    "space": {
        "depth": 2,
        "width": [64, 128],
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": 64,
        "optimizer": "adam",
    },
}


def throughput(workers: int, threads: int, n_trials: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "s.toml"
        training = {"max_epochs": epochs, "patience": epochs, "device": "cpu"}
        study_file.write_text(tomli_w.dumps({**STUDY, "n_trials": n_trials, "training": training}))
        url = f"sqlite:///{tmp}/s.db"
        cmd = [
            sys.executable,
            "-m",
            "selector",
            "run",
            str(study_file),
            "--storage",
            url,
            "--workers",
            str(workers),
        ]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ})
        trials = optuna.load_study(study_name="bench-workers", storage=url).trials
    start = min(t.datetime_start for t in trials if t.datetime_start)
    end = max(t.datetime_complete for t in trials if t.datetime_complete)
    return len(trials) / (end - start).total_seconds()


CONTENDERS = [(1, os.cpu_count() or 1), (1, 1), (2, max(1, (os.cpu_count() or 1) // 2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in CONTENDERS}
    for r in range(args.repeats):
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        for workers, threads in order:
            rates[workers, threads].append(throughput(workers, threads, args.trials, args.epochs))
        line = ", ".join(f"{w}w x {t}t {rates[w, t][-1]:.2f}" for w, t in CONTENDERS)
        print(f"  repeat {r + 1}/{args.repeats}: {line} trials/s", file=sys.stderr, flush=True)
    base = statistics.median(rates[CONTENDERS[0]])
    print(
        f"\nstudy throughput on {os.cpu_count()} cores ({args.trials} digits trials, 5 folds, "
        f"{args.epochs} epochs):"
    )
    print(f"{'workers':>8} {'torch threads':>14} {'trials/s':>9} {'vs 1 worker':>12}")
    for (workers, threads), values in rates.items():
        rate = statistics.median(values)
        print(f"{workers:>8} {threads:>14} {rate:>9.2f} {rate / base:>12.2f}")


if __name__ == "__main__":
    main()
