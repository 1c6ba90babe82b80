"""`python -m bench.status`: how long `selector status` takes on a 500-trial SQLite study, against
`python -c "import optuna"` measured in the same run.

The study is the digits study file with 500 trials written the way the objective writes them
(`TrialRecord.to_user_attrs`, packed curves in the system attrs, out-of-fold predictions for
every complete trial), without training: status reads what is recorded, whatever produced it.
Each command runs `--repeat` times alternately, in fresh processes; the medians are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from selector import db, record, spec, storage, study
from selector.record import Curves, TrialRecord

ROOT = Path(__file__).resolve().parents[1]


def _trial(rng: np.random.Generator, number: int, k: int, epochs: int) -> optuna.trial.FrozenTrial:
    pruned = rng.random() < 0.4
    val = 0.9 + 0.08 * rng.random(k)
    e = int(rng.integers(3, epochs + 1)) if not pruned else int(rng.integers(1, 4))
    r = TrialRecord(
        number=number,
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        value=None if pruned else float(val.mean()),
        seed=number,
        fold_seeds=tuple(range(k)),
        worker=1,
        n_params=int(rng.integers(1_000, 500_000)),
        fold_scores=() if pruned else tuple(val),
        train_fold_scores=() if pruned else tuple(np.minimum(val + 0.02, 1.0)),
        best_epoch=None if pruned else e,
        epochs_run=e,
        pruned_at_epoch=e if pruned else None,
        seconds=float(rng.random() * 3),
        curves=None if pruned else Curves(rng.random((k, e)), rng.random(e), rng.random((e, 4))),
    )
    params = {
        "depth": int(rng.integers(1, 5)),
        "width": int(rng.integers(32, 513)),
        "optimizer": str(rng.choice(["adam", "adamw", "sgd"])),
        "lr": float(10 ** rng.uniform(-4, -1)),
    }
    dists = {
        "depth": IntDistribution(1, 4),
        "width": IntDistribution(32, 512, log=True),
        "optimizer": CategoricalDistribution(["adam", "adamw", "sgd"]),
        "lr": FloatDistribution(1e-4, 0.3, log=True),
    }
    return create_trial(
        state=r.state,
        value=r.value,
        params=params,
        distributions=dists,  # type: ignore[arg-type]
        user_attrs=r.to_user_attrs(),
        system_attrs=r.to_system_attrs(),
        intermediate_values={i + 1: float(v) for i, v in enumerate(rng.random(e))},
    )


def build(url: str, n: int) -> None:
    s = spec.load(ROOT / "studies" / "digits.toml")
    optuna_study, prep, _ = study.create_or_resume(s, url)
    rng = np.random.default_rng(0)
    k, rows = s.cv.folds, len(prep.dev)
    oof = []
    for number in range(n):
        t = _trial(rng, number, k, s.training.max_epochs)
        optuna_study.add_trial(t)
        if t.state == TrialState.COMPLETE:
            pred = rng.integers(0, 10, rows)
            oof.append(
                {
                    "study_name": s.name,
                    "trial_number": number,
                    "kind": "labels",
                    "data": record.pack_oof(pred, "labels"),
                }
            )
    with db.transaction(url) as conn:
        conn.execute(sa.insert(db.oof), oof)


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        url = storage.resolve_url(f"sqlite:///{tmp}/selector.db")
        build(url, args.trials)
        py = sys.executable
        selector = [py, "-m", "selector", "status", "digits-mlp", "--storage", url]
        contenders = {"import optuna": [py, "-c", "import optuna"], "selector status": selector}
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeat):
            for name, cmd in contenders.items():
                times[name].append(_time(cmd))
        base = statistics.median(times["import optuna"])
        print(f"selector status on a {args.trials}-trial SQLite study, load {os.getloadavg()}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<16} median {med:.3f} s (min {min(ts):.3f})  {med / base:.2f}x")


if __name__ == "__main__":
    main()
