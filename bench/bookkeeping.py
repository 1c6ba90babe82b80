"""`python -m bench.bookkeeping`: the share of trial time spent outside training, on SQLite.

Runs a small digits study in this process and times, on the main thread, every call into Optuna's
RDB storage (asks, tells, per-epoch reports, pruning checks, user attrs, the dashboard notes'
reads and writes) and the notes themselves, against the trials' wall time.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
import torch
from optuna.storages._cached_storage import _CachedStorage

from selector import notes, spec, storage, study

STUDY = {
    "name": "bench-bookkeeping",
    "metric": "accuracy",
    "n_trials": 12,
    "seed": 0,
    "data": {"source": "sklearn:digits"},
    "cv": {"folds": 5},
    "training": {"max_epochs": 20, "patience": 20, "device": "cpu"},
    "search": {"sampler": "tpe", "pruner": "none"},
    "space": {
        "depth": 3,
        "width": 256,
        "dropout": 0.2,
        "optimizer": "adamw",
        "batch_size": 128,
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    },
}


class Timer:
    """Seconds spent in wrapped calls on the main thread (outermost calls only)."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.depth = 0.0, 0, 0
        self.by_name: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.seconds, self.calls, self.by_name = 0.0, 0, {}

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread() or self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.seconds += took
                self.calls += 1
                self.depth -= 1
                entry = self.by_name.setdefault(fn.__name__, [0, 0.0])
                entry[0] += 1
                entry[1] += took

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument(
        "--pruner",
        choices=["none", "median"],
        default="none",
        help="with a pruner every epoch's score is written and checked at once",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    timer = Timer()
    # the cache in front of the RDB storage (what a study calls) and the RDB storage behind it
    for cls in (_CachedStorage, optuna.storages.RDBStorage):
        for name in [n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))]:
            setattr(cls, name, timer.wrap(getattr(cls, name)))
    notes.annotate_trial = timer.wrap(notes.annotate_trial)  # type: ignore[method-assign]
    storage.write_trial = timer.wrap(storage.write_trial)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            **STUDY,
            "n_trials": args.trials,
            "search": {"sampler": "tpe", "pruner": args.pruner},
        }
        s = spec.parse(raw, origin="bench.toml", base_dir=tmp)
        url = f"sqlite:///{tmp}/b.db"
        study.create_or_resume(s, url)
        timer.reset()  # creating the study is not a trial's cost
        start = time.perf_counter()
        study.run(s, url)
        wall = time.perf_counter() - start
    print(
        f"\n{args.trials} digits trials (5 folds, 20 epochs, stacked engine, 1 thread, pruner "
        f"{args.pruner}) on SQLite:"
    )
    print(f"  wall time of the run        {wall:8.2f} s")
    print(
        f"  storage calls and notes     {timer.seconds:8.2f} s in {timer.calls} calls "
        f"({1000 * timer.seconds / args.trials:.0f} ms per trial)"
    )
    print(f"  bookkeeping share           {100 * timer.seconds / wall:8.1f} %  (target <= 2 %)")
    print("  per trial, by call:")
    for name, (calls, secs) in sorted(timer.by_name.items(), key=lambda kv: -kv[1][1]):
        print(
            f"    {name:36s} {calls / args.trials:6.1f} calls {1000 * secs / args.trials:7.1f} ms"
        )


if __name__ == "__main__":
    main()
