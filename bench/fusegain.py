"""What fusing saves on the trials a search actually ran: `python -m bench.fusegain [DATASETS]`.

`bench.anytime`'s trials a minute measure two things at once: the engine, and where each
search goes (a search that settles on wide networks finishes fewer trials, fused or not). Here a
search is recorded once (`selector run`, one core, `--seconds`, the study's seed or `--seed`),
and its claims' fused models are trained twice: as recorded (`fused.cross_validate_group`, the
parts `fused.split_claim` cuts), and member by member with the stacked engine, as `--fuse 1`
trains a trial. Every member leaves at the epoch it left in the recording, in both. Parts of
one member train alone in the search too and are left out. The two ways alternate part by part
in one process (the machine's speed drifts within a minute), one such process on each core.

`--worth W1 W2 ...` measures the rule that trains a claim's wide trials alone instead
(`fused.WORTH`): each claim is cut at each value and trained whole (fused parts fused, parts of
one with the stacked engine), the values in turn claim by claim.

`--merge N` measures what bigger claims (or a key's members queued across claims) would save at
equal work: every N consecutive claims trained whole as claimed, against the same trials cut
and trained as one claim, in turn batch by batch.
"""

from __future__ import annotations

import argparse
import contextlib
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


def measure(
    db: str,
    study_path: str,
    claims: int,
    worths: list[float] | None = None,
    merge: int | None = None,
) -> dict[str, Any]:
    """In a child process: seconds fused and seconds member by member over the fused parts of
    the first `claims` recorded claims; with `worths`, seconds to train those claims whole as
    cut at each `fused.WORTH`; with `merge`, seconds to train them whole as claimed and with
    every `merge` consecutive claims cut as one."""
    import optuna
    import torch

    from bench.replay import recorded_claims
    from selector import data, fused, metrics, spec, stacked
    from selector.space import replay_config

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = spec.load(Path(study_path))
    dev = data.dev_set(data.prepare(study))
    folds = list(data.iter_folds(dev))
    metric = metrics.get(study.metric)
    by_claim = recorded_claims(db)
    n_out = dev.n_classes if dev.task == "classification" else 1

    shared = {
        "task": dev.task,
        "n_classes": dev.n_classes,
        "metric": metric,
        "training": study.training,
    }

    def together(configs: list[Any], seeds: list[int], last: list[int]) -> None:
        fused.cross_validate_group(
            configs,
            folds,
            seeds=seeds,
            on_epoch=lambda epoch, values: {
                m: optuna.TrialPruned() for m in values if epoch >= last[m]
            },
            **shared,
        )

    def apart(configs: list[Any], seeds: list[int], last: list[int]) -> None:
        for config, seed, stop in zip(configs, seeds, last, strict=True):

            def at(epoch: int, value: float, stop: int = stop) -> None:
                if epoch >= stop:
                    raise optuna.TrialPruned()

            with contextlib.suppress(optuna.TrialPruned):
                stacked.auto_cross_validate(config, folds, seed=seed, on_epoch=at, **shared)

    def whole(
        parts: list[list[int]], configs: list[Any], seeds: list[int], last: list[int]
    ) -> None:
        """A claim trained as cut: its fused parts fused, its parts of one alone."""
        for part in parts:
            way = together if len(part) > 1 else apart
            way(*([x[j] for j in part] for x in (configs, seeds, last)))

    def cut(configs: list[Any]) -> list[list[int]]:
        n_in = folds[0].X_train.shape[1]
        return fused.split_claim(configs, folds=len(folds), n_in=n_in, n_out=n_out, device="cpu")

    def recorded(trials: list[Any]) -> tuple[list[Any], list[int], list[int]]:
        """Configs, seeds and the epoch each left at."""
        configs = [replay_config(t.params, study.space) for t in trials]
        return (
            configs,
            [int(t.user_attrs["seed"]) for t in trials],
            [len(t.intermediate_values) for t in trials],
        )

    if merge:
        chosen = list(by_claim.values())[:claims]
        took = {"claimed": 0.0, "merged": 0.0}
        built = {"claimed": 0, "merged": 0}
        for i in range(0, len(chosen), merge):
            batch = chosen[i : i + merge]
            ways = {
                "claimed": [recorded(trials) for trials in batch],
                "merged": [recorded([t for trials in batch for t in trials])],
            }
            order = ["claimed", "merged"] if (i // merge) % 2 == 0 else ["merged", "claimed"]
            for way in order:
                cuts = [cut(configs) for configs, _, _ in ways[way]]
                if i == 0:  # the first batch once untimed: the first calls warm up more
                    for parts, args in zip(cuts, ways[way], strict=True):
                        whole(parts, *args)
                began = time.perf_counter()
                for parts, args in zip(cuts, ways[way], strict=True):
                    whole(parts, *args)
                took[way] += time.perf_counter() - began
                built[way] += sum(len(parts) for parts in cuts)
        return {
            "merge": took,
            "models": built,
            "claims": len(chosen),
            "members": sum(len(t) for t in chosen),
        }

    if worths:
        spent = {str(w): 0.0 for w in worths}
        models = {str(w): 0 for w in worths}
        chosen = list(by_claim.values())[:claims]
        for i, trials in enumerate(chosen):
            configs, seeds, last = recorded(trials)
            turn = worths[i % len(worths) :] + worths[: i % len(worths)]
            for w in turn:
                fused.WORTH = w
                parts = cut(configs)
                if i == 0:  # the first claim once untimed: the first calls warm up more
                    whole(parts, configs, seeds, last)
                began = time.perf_counter()
                whole(parts, configs, seeds, last)
                spent[str(w)] += time.perf_counter() - began
                models[str(w)] += len(parts)
        return {
            "worths": spent,
            "models": models,
            "claims": len(chosen),
            "members": sum(len(t) for t in chosen),
        }

    seconds = {"fused": 0.0, "alone": 0.0}
    parts = members = member_epochs = 0
    for trials in list(by_claim.values())[:claims]:
        configs, seeds, last = recorded(trials)
        for part in (p for p in cut(configs) if len(p) > 1):
            args = tuple([x[i] for i in part] for x in (configs, seeds, last))
            ways = [("fused", together), ("alone", apart)]
            if parts % 2:
                ways.reverse()
            if parts == 0:  # first calls import and warm up more: once, untimed
                for _, run in ways:
                    run(*args)
            for key, run in ways:
                began = time.perf_counter()
                run(*args)
                seconds[key] += time.perf_counter() - began
            parts += 1
            members += len(part)
            member_epochs += sum(args[2])
    return {"seconds": seconds, "parts": parts, "members": members, "epochs": member_epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="*", default=["penguins", "breast_cancer"])
    parser.add_argument("--seconds", type=int, default=90, help="length of the recorded search")
    parser.add_argument("--seed", type=int, help="the study's seed (default: the study file's)")
    parser.add_argument("--claims", type=int, default=30, help="recorded claims trained")
    parser.add_argument(
        "--worth",
        type=float,
        nargs="+",
        help="train the claims whole, cut at each of these fused.WORTH values, and compare",
    )
    parser.add_argument(
        "--merge",
        type=int,
        help="train every N consecutive claims as claimed and cut as one claim, and compare",
    )
    parser.add_argument(
        "--fuse", help="record the search with `selector run --fuse` (default: the study's)"
    )
    parser.add_argument("--child", nargs=3, metavar=("DB", "STUDY", "CLAIMS"))
    args = parser.parse_args()
    if args.child:
        db, study, claims = args.child
        print(json.dumps(measure(db, study, int(claims), args.worth, args.merge)))
        return
    from bench.anytime import one_thread_env, study_file
    from bench.replay import record

    print(environment())
    with tempfile.TemporaryDirectory(prefix="selector-fusegain-") as tmp:
        work = Path(tmp)
        for dataset in args.datasets:
            study = study_file(dataset, work, seed=args.seed)
            db = record(dataset, args.seconds, work, study, fuse=args.fuse)
            procs = []
            for core in sorted(os.sched_getaffinity(0)):
                cmd = ["taskset", "-c", str(core), sys.executable, "-m", "bench.fusegain"]
                cmd += ["--child", str(db), str(study), str(args.claims)]
                if args.worth:
                    cmd += ["--worth", *map(str, args.worth)]
                if args.merge:
                    cmd += ["--merge", str(args.merge)]
                procs.append(
                    (
                        core,
                        subprocess.Popen(
                            cmd, cwd=ROOT, stdout=subprocess.PIPE, env=one_thread_env()
                        ),
                    )
                )
            seed = "the study's seed" if args.seed is None else f"seed {args.seed}"
            fuse = "" if args.fuse is None else f", --fuse {args.fuse}"
            print(
                f"{dataset} ({seed}{fuse}): the first {args.claims} claims of a "
                f"{args.seconds} s search"
            )
            for core, p in procs:
                out, _ = p.communicate()
                if p.returncode != 0:
                    raise SystemExit(f"the measurement on core {core} failed (exit {p.returncode})")
                r = json.loads(out)
                if args.merge:
                    t, m = r["merge"], r["models"]
                    print(
                        f"  core {core}: {r['claims']} claims, {r['members']} trials: as claimed "
                        f"{t['claimed']:.2f} s ({m['claimed']} models), every {args.merge} "
                        f"merged {t['merged']:.2f} s ({m['merged']} models): "
                        f"{t['claimed'] / t['merged']:.2f}x faster merged"
                    )
                    continue
                if args.worth:
                    first = str(args.worth[0])
                    told = ", ".join(
                        f"WORTH {w}: {t:.2f} s, {r['models'][w]} models "
                        f"({t / r['worths'][first]:.2f}x the time at {first})"
                        for w, t in r["worths"].items()
                    )
                    print(f"  core {core}: {r['claims']} claims, {r['members']} trials: {told}")
                    continue
                s = r["seconds"]
                print(
                    f"  core {core}: {r['parts']} fused models of {r['members']} members, "
                    f"{r['epochs']} member-epochs: fused {s['fused']:.2f} s, one by one "
                    f"{s['alone']:.2f} s: fusing {s['alone'] / s['fused']:.2f}x faster"
                )
            print(f"  load {os.getloadavg()[0]:.2f} (1 min) after {dataset}", flush=True)


if __name__ == "__main__":
    main()
