"""Best CV score against wall time for whole searches: `python -m bench.anytime`.

Four contenders search the same space on the same folds, each in its own process, pinned to its
own core with one thread (`taskset`), two at a time side by side:

  (a) the typical Optuna script: TPE, a DataLoader per fold, folds in turn, no pruning (each fold
      trains up to max_epochs with the study's patience and scores its best epoch);
  (b) the same with Optuna's MedianPruner on the running mean over folds;
  (c) `selector run --fuse 1` (one trial at a time, the stacked engine);
  (d) `selector run` as shipped (fused trials, `[search] fuse = "auto"`).

For each data set it prints trials per minute, the share of them pruned, the K-fold epochs a
trial trained and the epochs trained a minute (the engine's work, whatever the pruner cut), the
best CV score at 1, 2, 4 and 8 minutes, the time each contender needs to reach (a)'s final best,
and the test score of each one's chosen config (its refit on all dev rows, scored once on the
held-out rows). One seed is one search, and where a search goes decides its trials a minute as
much as the engine does (which networks it settles on, and how much the median pruner cuts: the
median of quantised scores such as accuracy can settle a step lower in one search than in
another, and each trial then trains longer): `--seeds 0 1 2`
runs each data set under several study seeds (`--only cd`: those contenders) and adds each
one's mean over them. `--calibrate` prints the fused engine's measured step costs instead
(`selector.fused.COST`). On a GPU (`--device cuda --c-workers 4`): (c) with 4 workers sharing
the GPU, then (d), each alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import environment

ROOT = Path(__file__).resolve().parents[1]
MARKS = (1, 2, 4, 8)  # minutes at which the best CV score is shown
CONTENDERS = {
    "a": "(a) Optuna + DataLoader, TPE",
    "b": "(b) (a) + MedianPruner",
    "c": "(c) selector run --fuse 1",
    "d": "(d) selector run",
}

SYNTHETIC_STUDY = """
name = "bench-synthetic"
metric = "accuracy"
n_trials = 100000
seed = 0

[data]
path = "{path}"
target = "target"
test_size = 0.2

[cv]
folds = 5

[training]
max_epochs = 20
patience = 4
device = "cpu"

[space]
depth = {{ low = 1, high = 3 }}
width = {{ low = 64, high = 512, log = true }}
activation = ["relu", "leaky_relu", "gelu"]
dropout = {{ low = 0.0, high = 0.3 }}
weight_decay = {{ low = 1e-6, high = 1e-2, log = true }}
batch_size = [128, 256, 512]
optimizer = ["momentum", "rmsprop", "adam", "adamw"]
lr = {{ low = 3e-4, high = 3e-2, log = true }}
batch_norm = [false, true]
residual = [false, true]
"""


def study_file(dataset: str, workdir: Path, device: str = "cpu", seed: int | None = None) -> Path:
    """The study file a data set is searched with: the repository's, with an unbounded budget
    (the contenders run until their time is up), or the 50,000 x 100 set written here; `seed`
    replaces the study's seed (its test rows, folds, samplers and trial seeds)."""
    import tomllib

    import tomli_w

    if dataset == "synthetic":
        import numpy as np
        import pandas as pd
        from sklearn.datasets import make_classification

        X, y = make_classification(
            n_samples=50_000,
            n_features=100,
            n_informative=20,
            n_redundant=10,
            n_classes=5,
            random_state=0,
        )
        frame = pd.DataFrame(X.astype(np.float32), columns=[f"x{i}" for i in range(100)])
        frame["target"] = y
        csv = workdir / "synthetic.csv"
        frame.to_csv(csv, index=False)
        path = workdir / "synthetic.toml"
        text = SYNTHETIC_STUDY.format(path=csv).replace('"cpu"', f'"{device}"')
        if seed is not None:
            text = text.replace("seed = 0", f"seed = {seed}")
        path.write_text(text)
        return path
    raw = tomllib.loads((ROOT / "studies" / f"{dataset}.toml").read_text())
    raw["n_trials"] = 100_000
    if seed is not None:
        raw["seed"] = seed
    raw.setdefault("training", {})["device"] = device
    data = raw["data"]
    if "path" in data:
        data["path"] = str((ROOT / "studies" / data["path"]).resolve())
    path = workdir / f"{dataset}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


# --- contenders (a) and (b): the script a practitioner writes -----------------------------------


def typical(study_path: Path, minutes: float, pruned: bool, out: Path, t0: float) -> None:
    """Contender (a) or (b), in this process: an in-memory Optuna study over the study file's
    space, trained with DataLoaders, fold after fold."""
    import numpy as np
    import optuna
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from selector import data, engine, final, metrics, spec
    from selector.model import build_mlp
    from selector.space import replay_config, sample_config

    torch.set_num_threads(1)
    s = spec.load(study_path)
    prep = data.prepare(s)
    dev = data.dev_set(prep)
    folds = list(data.iter_folds(dev))
    metric = metrics.get(s.metric)
    task, n_classes = dev.task, dev.n_classes
    tr = s.training
    log: list[dict[str, Any]] = []

    def fold_score(config: Any, fold: data.FoldData, seed: int) -> tuple[float, int, int]:
        torch.manual_seed(seed)
        n_out = n_classes if task == "classification" else 1
        model = build_mlp(config, fold.X_train.shape[1], n_out)
        opt = engine.make_optimizer(config, model.parameters())
        schedule = engine.make_schedule(config, opt, tr.max_epochs)
        loader = DataLoader(
            TensorDataset(torch.from_numpy(fold.X_train), torch.from_numpy(fold.y_train)),
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=len(fold.y_train) % config.batch_size == 1,  # batch norm needs 2 rows
        )
        x_val = torch.from_numpy(fold.X_val)
        best, best_epoch = -math.inf, 0
        for epoch in range(1, tr.max_epochs + 1):
            model.train()
            for xb, yb in loader:
                opt.zero_grad()
                out = model(xb)
                if task == "regression":
                    loss = F.mse_loss(out.squeeze(-1), yb)
                else:
                    loss = F.cross_entropy(out, yb)
                loss.backward()
                if config.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
            if schedule is not None:
                schedule.step()
            if not math.isfinite(float(loss.detach())):
                raise optuna.TrialPruned("diverged")
            pred = engine.predict(model, x_val, task=task, y_mean=fold.y_mean, y_std=fold.y_std)
            score = engine.score(metric, fold.y_val, pred, n_classes)
            if score > best:
                best, best_epoch = score, epoch
            if epoch - best_epoch >= tr.patience:
                break
        return best, best_epoch, epoch

    def objective(trial: optuna.Trial) -> float:
        config = sample_config(trial, s.space)
        scores, epochs = [], []
        ran = 0  # fold-epochs trained
        try:
            for k, fold in enumerate(folds):
                seed = engine.derive_seed(s.seed, trial.number, k)
                score, epoch, n = fold_score(config, fold, seed)
                scores.append(score)
                epochs.append(epoch)
                ran += n
                trial.report(float(np.mean(scores)), k)
                if pruned and trial.should_prune():
                    raise optuna.TrialPruned()
        finally:  # once a trial, pruned or not
            trial.set_user_attr("epochs", ran / len(folds))
        trial.set_user_attr("best_epoch", round(float(np.mean(epochs))))
        return float(np.mean(scores))

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        epochs = trial.user_attrs.get("epochs", 0.0)
        log.append(
            {
                "t": time.time() - t0,
                "state": trial.state.name,
                "value": trial.value,
                "epochs": epochs,
            }
        )

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = optuna.pruners.MedianPruner() if pruned else optuna.pruners.NopPruner()
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=s.seed), pruner=pruner
    )
    deadline = t0 + minutes * 60
    study.optimize(objective, timeout=max(1.0, deadline - time.time()), callbacks=[record])
    test = None
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is not None:  # the chosen config refit on all dev rows, scored on the test rows once
        config = replay_config(best.params, s.space)
        test_part = data.test_set(prep)
        _, (x_dev, x_test) = data.fit_transform(dev.X, test_part.X)
        model, mean, std = final.refit(
            s,
            config,
            x_dev,
            dev.y,
            task=task,
            n_classes=n_classes,
            epochs=int(best.user_attrs["best_epoch"]),
        )
        pred = engine.predict(model, torch.as_tensor(x_test), task=task, y_mean=mean, y_std=std)
        test = engine.score(metric, test_part.y, pred, n_classes)
    out.write_text(json.dumps({"trials": log, "test": test}))


# --- contenders (c) and (d): selector run --------------------------------------------------------


def selector_run(
    study_path: Path, minutes: float, fuse: str | None, out: Path, t0: float, workers: int = 1
) -> None:
    """Contender (c) or (d): `selector run` in a child process until its time is up, then its
    chosen trial's test score (`selector final`)."""
    import optuna

    from selector import api, spec

    db = out.with_suffix(".db")
    url = f"sqlite:///{db}"
    cmd = [
        sys.executable,
        "-m",
        "selector",
        "run",
        str(study_path),
        "--storage",
        url,
        "--workers",
        str(workers),
        "--threads",
        "1",
        "--timeout",
        str(max(1, int(t0 + minutes * 60 - time.time()))),
    ]
    if fuse is not None:
        cmd += ["--fuse", fuse]
    with open(out.with_suffix(".log"), "w") as log_file:
        subprocess.run(
            cmd, check=True, stdout=log_file, stderr=subprocess.STDOUT, env=one_thread_env()
        )
    name = spec.load(study_path).name
    study = optuna.load_study(study_name=name, storage=url)
    log = [
        {
            "t": t.datetime_complete.timestamp() - t0,  # type: ignore[union-attr]
            "state": t.state.name,
            "value": t.value,
            "epochs": len(t.intermediate_values),  # one a K-fold epoch
        }
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and t.datetime_complete is not None
    ]
    test = None
    if any(t["state"] == "COMPLETE" for t in log):
        api.export(name, storage=url)
        test = api.final(name, storage=url, early=True, progress=False).result.test_score
    out.write_text(json.dumps({"trials": log, "test": test}))


def one_thread_env() -> dict[str, str]:
    """This process's environment with BLAS and OpenMP at one thread, for a pinned child."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- the parent: pairs side by side, then the table ---------------------------------------------


@dataclass
class Outcome:
    name: str
    trials: list[dict[str, Any]]
    test: float | None
    minutes: float

    def finished(self, until: float | None = None) -> list[dict[str, Any]]:
        end = self.minutes * 60 if until is None else until
        return [t for t in self.trials if t["t"] <= end]

    def best_at(self, seconds: float) -> float | None:
        values = [t["value"] for t in self.finished(seconds) if t["state"] == "COMPLETE"]
        return max(values) if values else None

    def best_of_first(self, n: int) -> float | None:
        """The best CV score among the first `n` trials finished: search quality per trial,
        whatever the speed (how grouping affects the sampler's choices)."""
        done = sorted(
            (t for t in self.finished() if t["state"] in ("COMPLETE", "PRUNED")),
            key=lambda t: t["t"],
        )[:n]
        values = [t["value"] for t in done if t["state"] == "COMPLETE"]
        return max(values) if values else None

    def done(self) -> list[dict[str, Any]]:
        """Trials finished (complete or pruned) within the time."""
        return [t for t in self.finished() if t["state"] in ("COMPLETE", "PRUNED")]

    def count(self) -> int:
        return len(self.done())

    def pruned_share(self) -> float:
        done = self.done()
        return sum(t["state"] == "PRUNED" for t in done) / max(len(done), 1)

    def epochs(self) -> float:
        """K-fold epochs trained by the finished trials (an epoch of all K folds is one; a
        trial pruned after 2 of 5 folds of 10 epochs counts 4): the engine's work, whatever
        the pruner cut."""
        return float(sum(t.get("epochs", 0.0) for t in self.done()))

    def time_to(self, target: float | None) -> float | None:
        if target is None:
            return None
        hits = [
            t["t"]
            for t in sorted(self.finished(), key=lambda t: t["t"])
            if t["state"] == "COMPLETE" and t["value"] >= target
        ]
        return hits[0] if hits else None


def _launch(
    key: str, study_path: Path, minutes: float, out: Path, core: int | None, c_workers: int = 1
) -> subprocess.Popen:
    pin = ["taskset", "-c", str(core)] if core is not None else []
    cmd = [*pin, sys.executable, "-m", "bench.anytime", "--contender", key]
    cmd += ["--c-workers", str(c_workers)]
    cmd += ["--study", str(study_path), "--minutes", str(minutes), "--out", str(out)]
    cmd += ["--t0", repr(time.time())]
    return subprocess.Popen(cmd, cwd=ROOT, env=one_thread_env())


def run_dataset(
    dataset: str,
    minutes: float,
    workdir: Path,
    device: str = "cpu",
    c_workers: int = 1,
    *,
    seed: int | None = None,
    only: str = "abcd",
) -> dict[str, Outcome]:
    """The contenders in `only` on one data set: on the CPU (a) and (b), then (c) and (d), side
    by side, each pinned to its own core; on a GPU (c) with `c_workers` workers, then (d), one
    after the other (each has the GPU to itself)."""
    study_path = study_file(dataset, workdir, device, seed)
    outcomes = {}
    cores = sorted(os.sched_getaffinity(0))
    rounds: list[list[tuple[str, int | None]]]
    if device == "cpu":
        rounds = [
            list(zip([k for k in pair if k in only], [cores[0], cores[-1]], strict=False))
            for pair in (("a", "b"), ("c", "d"))
        ]
    else:
        rounds = [[(key, None)] for key in "cd" if key in only]
    rounds = [r for r in rounds if r]
    for contenders in rounds:
        procs = []
        for key, core in contenders:
            out = workdir / f"{dataset}-{key}.json"
            procs.append((key, out, _launch(key, study_path, minutes, out, core, c_workers)))
        for key, out, p in procs:
            if p.wait() != 0:
                raise SystemExit(f"contender {key} on {dataset} failed (exit {p.returncode})")
            got = json.loads(out.read_text())
            name = CONTENDERS[key] + (
                f", {c_workers} workers" if key == "c" and c_workers > 1 else ""
            )
            outcomes[key] = Outcome(name, got["trials"], got["test"], minutes)
    return outcomes


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def table(dataset: str, outcomes: dict[str, Outcome], minutes: float) -> str:
    marks = [m for m in MARKS if m <= minutes]
    target = outcomes["a"].best_at(minutes * 60) if "a" in outcomes else None
    head = f"{'contender':40}{'trials':>8}{'/min':>8}{'pruned':>8}{'epochs':>8}{'ep/min':>8}"
    head += "".join(f"{f'best@{m}m':>11}" for m in marks)
    head += f"{'reach (a)':>11}{'test':>9}"
    lines = [f"{dataset}: best CV score against wall time ({minutes:g} min each)", head]
    for o in outcomes.values():
        reach = o.time_to(target)
        n, epochs = o.count(), o.epochs()
        row = f"{o.name:40}{n:>8}{n / minutes:>8.1f}"
        row += f"{o.pruned_share():>8.0%}{epochs / max(n, 1):>8.1f}{epochs / minutes:>8.0f}"
        row += "".join(f"{_fmt(o.best_at(m * 60)):>11}" for m in marks)
        row += f"{'-' if reach is None else f'{reach:.0f} s':>11}{_fmt(o.test):>9}"
        lines.append(row)
    c, d = outcomes.get("c"), outcomes.get("d")
    if c is not None and d is not None:
        lines.append(
            f"(d) / (c) trials: {d.count() / max(c.count(), 1):.2f}x; "
            f"K-fold epochs trained: {d.epochs() / max(c.epochs(), 1e-9):.2f}x"
        )
    n = min(o.count() for o in outcomes.values())
    per_trial = ", ".join(f"{k} {_fmt(o.best_of_first(n))}" for k, o in outcomes.items())
    lines.append(
        f"best CV after the first {n} trials of each (search quality per trial): {per_trial}"
    )
    if d is not None and target is not None:
        reach = d.time_to(target)
        if reach is not None:
            share = reach / (minutes * 60)
            lines.append(f"(d) reached (a)'s {minutes:g}-min best in {share:.3f} of the time")
        else:
            lines.append(f"(d) did not reach (a)'s {minutes:g}-min best ({target:.4f})")
    return "\n".join(lines)


def seeds_table(dataset: str, runs: dict[int, dict[str, Outcome]], minutes: float) -> str:
    """The same contenders over several study seeds: each one's mean trials a minute and mean
    best CV at each mark, and at how many seeds (d)'s best is at least (c)'s. One seed is one
    search: whether one contender's search is better than another's at equal time takes
    several."""
    marks = [m for m in MARKS if m <= minutes]
    keys = list(next(iter(runs.values())))
    seeds = sorted(runs)
    lines = [
        f"{dataset}: over seeds {', '.join(map(str, seeds))}: mean best CV against wall time",
        f"{'contender':40}{'/min':>8}{'ep/min':>8}" + "".join(f"{f'best@{m}m':>11}" for m in marks),
    ]
    for key in keys:
        got = [runs[s][key] for s in seeds]
        row = f"{got[0].name:40}{sum(o.count() for o in got) / len(got) / minutes:>8.1f}"
        row += f"{sum(o.epochs() for o in got) / len(got) / minutes:>8.0f}"
        for m in marks:
            values = [o.best_at(m * 60) for o in got]
            known = [v for v in values if v is not None]
            row += f"{_fmt(sum(known) / len(known) if len(known) == len(values) else None):>11}"
        lines.append(row)
    if "c" in keys and "d" in keys and marks:
        counts = []
        for m in marks:
            pairs = [(runs[s]["c"].best_at(m * 60), runs[s]["d"].best_at(m * 60)) for s in seeds]
            ahead = sum(d is not None and (c is None or d >= c) for c, d in pairs)
            counts.append(f"{m} min {ahead}/{len(seeds)}")
        lines.append(f"seeds where (d)'s best is at least (c)'s: {', '.join(counts)}")
    return "\n".join(lines)


def calibrate() -> None:
    """The fused engine's step cost at a few sizes on this machine, one thread: what
    `selector.fused.COST` holds (fixed part, part per member, arithmetic rate)."""
    import numpy as np
    import torch

    from selector import data, engine, fused, spec
    from selector.space import TrialConfig

    torch.set_num_threads(1)
    s = spec.load(ROOT / "studies" / "digits.toml")
    folds = list(data.iter_folds(data.dev_set(data.prepare(s))))
    rows = []
    for width in (8, 32, 128, 256):
        config = TrialConfig(depth=2, width=width, batch_size=64)
        for m in (1, 4, 16):
            run = fused.FusedRun(
                [config] * m,
                folds,
                task="classification",
                n_out=10,
                max_epochs=1,
                seeds=[[engine.derive_seed(i, k) for k in range(5)] for i in range(m)],
                device=torch.device("cpu"),
            )
            flops = fused.step_flops(config, folds=5, n_in=64, n_out=10)
            rows.append((m, flops, run.time_steps(10)))
            print(f"width {width:4d} members {m:3d}: {rows[-1][2] * 1e3:8.3f} ms a step")
    A = np.array([[1.0, m, m * f] for m, f, _ in rows])
    b = np.array([t for _, _, t in rows])
    fixed, per_member, per_flop = np.linalg.lstsq(A, b, rcond=None)[0]
    print(f"fixed {fixed:.2e} s, per member {per_member:.2e} s, rate {1 / per_flop:.2e} FLOP/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.anytime", description=__doc__.split("\n")[0])
    p.add_argument(
        "datasets", nargs="*", default=["penguins", "breast_cancer", "digits", "synthetic"]
    )
    p.add_argument("--minutes", type=float, default=8.0, help="wall time of each contender")
    p.add_argument(
        "--seeds", type=int, nargs="+", help="study seeds, one search each (default: the study's)"
    )
    p.add_argument("--only", default="abcd", help="the contenders to run, e.g. cd (default: abcd)")
    p.add_argument("--calibrate", action="store_true", help="measure the fused engine's step costs")
    p.add_argument("--device", default="cpu", help="cpu (contenders pinned in pairs) or cuda")
    p.add_argument(
        "--c-workers", type=int, default=1, help="workers of (c) (on a GPU: 4, sharing it)"
    )
    p.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    p.add_argument("--study", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calibrate:
        calibrate()
        return
    if args.contender:
        t0 = args.t0 or time.time()
        if args.contender in ("a", "b"):
            typical(args.study, args.minutes, args.contender == "b", args.out, t0)
        else:
            fuse = "1" if args.contender == "c" else None
            workers = args.c_workers if args.contender == "c" else 1
            selector_run(args.study, args.minutes, fuse, args.out, t0, workers)
        return
    print(environment())
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            runs = {}
            for seed in args.seeds or [None]:
                workdir = Path(tmp) / f"seed-{seed}"  # each search in a database of its own
                workdir.mkdir(exist_ok=True)
                outcomes = run_dataset(
                    dataset,
                    args.minutes,
                    workdir,
                    args.device,
                    args.c_workers,
                    seed=seed,
                    only=args.only,
                )
                name = dataset if seed is None else f"{dataset}, seed {seed}"
                print(table(name, outcomes, args.minutes), flush=True)
                print(f"load {os.getloadavg()[0]:.2f} (1 min) after {name}\n", flush=True)
                runs[seed] = outcomes
            if len(runs) > 1:
                print(seeds_table(dataset, runs, args.minutes) + "\n", flush=True)


if __name__ == "__main__":
    main()
