"""The fused engine's time on a recorded search, this checkout against another revision:
`python -m bench.replay DATASETS [--against REV]`.

Trials finished side by side do not measure a change to the engine's numbers: a change in
float32 rounding moves every score a little, TPE proposes other trials from the first group on,
and the two searches train different networks. So a search is recorded once (`selector run
--fuse auto`, one core, `--seconds`), and both versions train its fused groups as recorded: the
same members (params and seeds), cut into the same parts (`fused.split_by_width`), each member
leaving its part at the epoch it left in the recording (pruned or stopped). Only the fused
engine is timed (`fused.cross_validate_group`); parts of one train alone in both and are left
out. The two versions run side by side, each pinned to its own core with one thread, then again
with the cores swapped; REV is checked out in a temporary git worktree.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def record(dataset: str, seconds: int, workdir: Path) -> Path:
    """A search of `seconds` on one core, recorded in a fresh SQLite database."""
    from bench.anytime import study_file

    study = study_file(dataset, workdir)
    db = workdir / f"{dataset}-recorded.db"
    cmd = [sys.executable, "-m", "selector", "run", str(study), "--storage", f"sqlite:///{db}"]
    cmd += ["--workers", "1", "--threads", "1", "--timeout", str(seconds)]
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    subprocess.run([*pin, *cmd], check=True, cwd=ROOT, env=_env(), capture_output=True)
    return db


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def replay(tree: str, db: str, study_path: str, groups: int) -> dict[str, float]:
    """In a child process: the first `groups` recorded groups trained by the `selector` package
    of `tree`, each member leaving at its recorded epoch; the engine's seconds."""
    sys.path.insert(0, tree)
    import optuna
    import torch

    from selector import data, fused, metrics, spec
    from selector.space import replay_config

    if not fused.__file__ or not fused.__file__.startswith(tree):
        raise SystemExit(f"selector was imported from {fused.__file__}, not from {tree}")
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = spec.load(Path(study_path))
    dev = data.dev_set(data.prepare(study))
    folds = list(data.iter_folds(dev))
    url = f"sqlite:///{db}"
    name = optuna.get_all_study_names(url)[0]
    by_group = collections.defaultdict(list)
    for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False):
        if t.state.name in ("COMPLETE", "PRUNED") and "group" in t.user_attrs:
            by_group[t.user_attrs["group"]].append(t)
    n_out = dev.n_classes if dev.task == "classification" else 1
    seconds, member_epochs, parts = 0.0, 0, 0
    for _, members in sorted(by_group.items())[:groups]:
        configs = [replay_config(t.params, study.space) for t in members]
        n_in = folds[0].X_train.shape[1]
        cut = fused.split_by_width(configs, folds=len(folds), n_in=n_in, n_out=n_out, device="cpu")
        for part in (p for p in cut if len(p) > 1):
            last = [len(members[i].intermediate_values) for i in part]

            def leave(epoch: int, values: dict[int, float], last: list[int] = last) -> dict:
                return {m: optuna.TrialPruned() for m in values if epoch >= last[m]}

            began = time.perf_counter()
            fused.cross_validate_group(
                [configs[i] for i in part],
                folds,
                task=dev.task,
                n_classes=dev.n_classes,
                metric=metrics.get(study.metric),
                training=study.training,
                seeds=[members[i].user_attrs["seed"] for i in part],
                on_epoch=leave,
            )
            seconds += time.perf_counter() - began
            member_epochs += sum(last)
            parts += 1
    return {"seconds": seconds, "member_epochs": member_epochs, "parts": parts}


def side_by_side(trees: dict[str, str], db: Path, study: Path, groups: int) -> list[dict]:
    """Both trees replay at once, each on its own core; then the cores swapped."""
    cores = sorted(os.sched_getaffinity(0))
    rounds = []
    for swap in (False, True):
        procs = {}
        for i, (label, tree) in enumerate(trees.items()):
            core = cores[(i + swap) % len(cores)]
            cmd = ["taskset", "-c", str(core), sys.executable, str(Path(__file__).resolve())]
            cmd += ["--child", tree, "--db", str(db), "--study", str(study)]
            cmd += ["--groups", str(groups)]
            procs[label] = (core, subprocess.Popen(cmd, stdout=subprocess.PIPE, env=_env()))
        got = {}
        for label, (core, p) in procs.items():
            out, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"the replay of {label} failed (exit {p.returncode})")
            got[label] = {**json.loads(out), "core": core}
        rounds.append(got)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="*", default=["penguins", "breast_cancer"])
    parser.add_argument("--against", default="HEAD", help="the revision to compare with")
    parser.add_argument("--seconds", type=int, default=90, help="length of the recorded search")
    parser.add_argument("--groups", type=int, default=40, help="recorded groups replayed")
    parser.add_argument("--child")
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
            print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} (1 min)")
            trees = {"this checkout": str(ROOT), f"{args.against} ({rev})": str(base)}
            for dataset in args.datasets:
                db = record(dataset, args.seconds, work)
                rounds = side_by_side(trees, db, study_file(dataset, work), args.groups)
                first = rounds[0]["this checkout"]
                print(
                    f"{dataset}: {args.groups} groups of a {args.seconds} s search, "
                    f"{first['parts']} fused parts, {first['member_epochs']} member-epochs"
                )
                ratios = []
                for i, got in enumerate(rounds, 1):
                    cells = ", ".join(
                        f"{label} {r['seconds']:.2f} s (core {r['core']})"
                        for label, r in got.items()
                    )
                    new, old = (r["seconds"] for r in got.values())
                    ratios.append(new / old)
                    print(f"  round {i}: {cells}: {new / old:.3f}x the time")
                print(f"  this checkout: {math.sqrt(ratios[0] * ratios[1]):.3f}x the time of {rev}")
                print(f"  load {os.getloadavg()[0]:.2f} (1 min) after {dataset}")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True
            )


if __name__ == "__main__":
    main()
