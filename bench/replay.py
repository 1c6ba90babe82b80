"""The fused engine's time on a recorded search, this checkout against another revision:
`python -m bench.replay [DATASETS] [--against REV]`.

Trials finished side by side do not measure a change to the engine's numbers: a change in
float32 rounding moves every score a little, TPE proposes other trials from the first group on,
and the two searches train different networks. So a search is recorded once (`selector run`,
one core, `--seconds`), and both versions train its fused groups as recorded: the same members
(params and seeds), cut into the same parts (`fused.split_claim`), each member leaving its
part at the epoch it left in the recording (pruned or stopped). Only the fused engine is timed
(`fused.cross_validate_group`); parts of one train alone in both and are left out. Both versions
are imported into one process (REV from a temporary git worktree) and train each part in turn,
the order alternating (the first part once more, untimed, for each: a first call imports more),
so that the machine's speed, which drifts by 10% within a minute here, is the same for both; one
such process runs on each core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import environment

ROOT = Path(__file__).resolve().parents[1]


def record(
    dataset: str, seconds: int, workdir: Path, study: Path | None = None, fuse: str | None = None
) -> Path:
    """A search of `seconds` on one core, recorded in a fresh SQLite database (of `study`,
    default the benchmark's study file of `dataset`; `fuse`: `selector run --fuse`)."""
    from bench.anytime import one_thread_env, study_file

    study = study or study_file(dataset, workdir)
    db = workdir / f"{dataset}-recorded.db"
    cmd = [sys.executable, "-m", "selector", "run", str(study), "--storage", f"sqlite:///{db}"]
    cmd += ["--workers", "1", "--threads", "1", "--timeout", str(seconds)]
    if fuse is not None:
        cmd += ["--fuse", fuse]
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    done = subprocess.run(
        [*pin, *cmd], cwd=ROOT, env=one_thread_env(), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"recording {dataset} failed (exit {done.returncode}): {done.stderr}")
    return db


def recorded_claims(db: str | Path) -> dict[int, list[Any]]:
    """The finished trials of a recorded search's fused claims, by claim (its first trial's
    number), in order of claims and of trial numbers."""
    import optuna

    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    claims = collections.defaultdict(list)
    for t in study.get_trials(deepcopy=False):
        if t.state.name in ("COMPLETE", "PRUNED") and "group" in t.user_attrs:
            claims[t.user_attrs["group"]].append(t)
    return dict(sorted(claims.items()))


def _load(tree: str) -> dict[str, Any]:
    """The `selector` package of `tree`, imported under its own name and then taken out of
    `sys.modules`, so that another tree's can be imported next to it in this process (each
    module keeps the modules it imported)."""
    sys.path.insert(0, tree)
    try:
        from selector import data, fused, metrics, spec
        from selector.space import replay_config
    finally:
        sys.path.remove(tree)
    if not fused.__file__ or not fused.__file__.startswith(tree):
        raise SystemExit(f"selector was imported from {fused.__file__}, not from {tree}")
    for name in [m for m in sys.modules if m == "selector" or m.startswith("selector.")]:
        del sys.modules[name]
    return {"data": data, "fused": fused, "metrics": metrics, "spec": spec, "config": replay_config}


def replay(trees: list[str], db: str, study_path: str, groups: int) -> dict[str, Any]:
    """In a child process: the first `groups` recorded groups trained by the `selector` package
    of each tree in turn, part by part (the order alternating), each member leaving at its
    recorded epoch; each tree's seconds in the fused engine."""
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    versions = [_load(tree) for tree in trees]
    first = versions[0]
    study = first["spec"].load(Path(study_path))
    dev = first["data"].dev_set(first["data"].prepare(study))
    folds = list(first["data"].iter_folds(dev))
    by_group = recorded_claims(db)
    n_out = dev.n_classes if dev.task == "classification" else 1
    n_in = folds[0].X_train.shape[1]
    seconds = [0.0] * len(versions)
    member_epochs = parts = 0
    for members in list(by_group.values())[:groups]:
        configs = [first["config"](t.params, study.space) for t in members]
        cut = first["fused"].split_claim(
            configs, folds=len(folds), n_in=n_in, n_out=n_out, device="cpu"
        )
        for part in (p for p in cut if len(p) > 1):
            last = [len(members[i].intermediate_values) for i in part]

            def leave(epoch: int, values: dict[int, float], last: list[int] = last) -> dict:
                return {m: optuna.TrialPruned() for m in values if epoch >= last[m]}

            order = list(range(len(versions)))
            warm = [(v, False) for v in order] if parts == 0 else []  # first calls import more
            runs = warm + [(v, True) for v in (order if parts % 2 == 0 else order[::-1])]
            for v, timed in runs:
                mods = versions[v]
                began = time.perf_counter()
                mods["fused"].cross_validate_group(
                    [mods["config"](members[i].params, study.space) for i in part],
                    folds,
                    task=dev.task,
                    n_classes=dev.n_classes,
                    metric=mods["metrics"].get(study.metric),
                    training=study.training,
                    seeds=[members[i].user_attrs["seed"] for i in part],
                    on_epoch=leave,
                )
                seconds[v] += (time.perf_counter() - began) if timed else 0.0
            member_epochs += sum(last)
            parts += 1
    return {"seconds": seconds, "member_epochs": member_epochs, "parts": parts}


def replays(trees: list[str], db: Path, study: Path, groups: int) -> list[dict[str, Any]]:
    """One replay of both trees on each core, the two cores at once."""
    from bench.anytime import one_thread_env

    procs = []
    for core in sorted(os.sched_getaffinity(0)):
        cmd = ["taskset", "-c", str(core), sys.executable, "-m", "bench.replay"]
        cmd += ["--child", *trees, "--db", str(db), "--study", str(study)]
        cmd += ["--groups", str(groups)]
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env=one_thread_env())
        procs.append((core, child))
    out = []
    for core, p in procs:
        got, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"the replay on core {core} failed (exit {p.returncode})")
        out.append({**json.loads(got), "core": core})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="*", default=["penguins", "breast_cancer"])
    parser.add_argument("--against", default="HEAD", help="the revision to compare with")
    parser.add_argument("--seconds", type=int, default=90, help="length of the recorded search")
    parser.add_argument("--groups", type=int, default=40, help="recorded groups replayed")
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--db")
    parser.add_argument("--study")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(replay(args.child, args.db, args.study, args.groups)))
        return
    from bench.anytime import study_file

    with tempfile.TemporaryDirectory(prefix="selector-replay-") as tmp:
        work = Path(tmp)
        base = work / "against"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.against],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        rev = subprocess.run(
            ["git", "rev-parse", "--short", args.against],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        try:
            print(environment())
            label = rev if rev.startswith(args.against) else f"{args.against} ({rev})"
            for dataset in args.datasets:
                db = record(dataset, args.seconds, work)
                got = replays([str(ROOT), str(base)], db, study_file(dataset, work), args.groups)
                print(
                    f"{dataset}: {args.groups} groups of a {args.seconds} s search, "
                    f"{got[0]['parts']} fused parts, {got[0]['member_epochs']} member-epochs"
                )
                for r in got:
                    new, old = r["seconds"]
                    print(
                        f"  core {r['core']}: this checkout {new:.2f} s, {label} {old:.2f} s: "
                        f"{new / old:.3f}x the time"
                    )
                print(f"  load {os.getloadavg()[0]:.2f} (1 min) after {dataset}")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True
            )


if __name__ == "__main__":
    main()
