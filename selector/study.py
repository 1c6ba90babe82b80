"""Create or resume a study, and run a worker on it.

All input (study file, data, storage URL) is validated before the database is written, so a bad
input leaves nothing half-made. The study's record in `selector_studies` pins its spec hash and the
fingerprints of its data, split and folds; a run whose spec or data differ is refused with a diff.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import sklearn
import sqlalchemy as sa
import torch
from optuna.trial import FrozenTrial, TrialState

from selector import __version__, data, db, storage
from selector.engine import derive_seed
from selector.errors import RefusedError, SelectorError, StudyError
from selector.objective import Objective
from selector.spec import StudySpec, canonical_json, from_record, hashed_part

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class FailureStreakError(SelectorError):
    """Too many consecutive trials failed; the study stops with the last error."""

    exit_code = 1


def versions() -> dict[str, str]:
    return {
        "selector": __version__,
        "optuna": optuna.__version__,
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class Record:
    """A study's row in `selector_studies`."""

    name: str
    spec: StudySpec
    spec_hash: str
    fingerprints: dict[str, str]
    n_trials: int
    versions: dict[str, str]
    created_at: dt.datetime


def _row_to_record(row: Any, origin: str) -> Record:
    raw = json.loads(row.spec_json)
    return Record(
        name=row.study_name,
        spec=from_record(raw, row.base_dir, origin=origin),
        spec_hash=row.spec_hash,
        fingerprints={"data": row.data_fp, "split": row.split_fp, "folds": row.folds_fp},
        n_trials=row.n_trials,
        versions=json.loads(row.versions_json),
        created_at=row.created_at,
    )


def find_record(url: str, name: str) -> Record | None:
    with db.transaction(url) as conn:
        row = conn.execute(sa.select(db.studies).where(db.studies.c.study_name == name)).first()
    return None if row is None else _row_to_record(row, f"study {name!r} (recorded spec)")


def load_record(url: str, name: str) -> Record:
    """The record of an existing study; a clear error naming the studies that do exist if not."""
    rec = find_record(url, name)
    if rec is None:
        with db.transaction(url) as conn:
            names = [r[0] for r in conn.execute(sa.select(db.studies.c.study_name))]
        known = f"; studies here: {', '.join(names)}" if names else "; this storage has no studies"
        raise StudyError(f"no study {name!r} in {storage.mask(url)}{known}")
    return rec


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {canonical_json(old)} -> {canonical_json(new)}"]


def _check_same(rec: Record, spec: StudySpec, prep: data.Prepared) -> None:
    if rec.spec_hash != spec.spec_hash():
        changes = _diff(hashed_part(rec.spec.raw), hashed_part(spec.raw))
        raise StudyError(
            f"study {spec.name!r} was created from a different study file ("
            + "; ".join(changes)
            + "); restore it, or give the changed study a new name"
        )
    fps = prep.fingerprints.as_dict()
    changed = [k for k in ("data", "split", "folds") if rec.fingerprints[k] != fps[k]]
    if changed:
        raise StudyError(
            f"study {spec.name!r}: the {'/'.join(changed)} differ from when the study was created "
            f"({prep.table.origin}); a study's trials must all see the same data and folds — "
            "restore the data or start a new study"
        )


def create_or_resume(spec: StudySpec, url: str) -> tuple[optuna.Study, data.Prepared, Record]:
    """Validate data and storage, then create the study or check that it is the same study."""
    prep = data.prepare(spec)
    optuna_storage = storage.open_storage(url, must_exist=False)
    rec = find_record(url, spec.name)
    if rec is not None:
        _check_same(rec, spec, prep)
        if rec.n_trials != spec.n_trials:
            with db.transaction(url) as conn:
                conn.execute(
                    db.studies.update()
                    .where(db.studies.c.study_name == spec.name)
                    .values(n_trials=spec.n_trials)
                )
        study = optuna.load_study(study_name=spec.name, storage=optuna_storage)
        return study, prep, load_record(url, spec.name)
    return _create(spec, url, optuna_storage, prep)


def _create(
    spec: StudySpec, url: str, optuna_storage: optuna.storages.BaseStorage, prep: data.Prepared
) -> tuple[optuna.Study, data.Prepared, Record]:
    if spec.name in {s.study_name for s in optuna.get_all_study_summaries(optuna_storage, False)}:
        raise StudyError(
            f"an Optuna study named {spec.name!r} already exists in {storage.mask(url)} but was not "
            "created by selector; choose another name"
        )
    study = optuna.create_study(
        study_name=spec.name, storage=optuna_storage, direction=spec.study_direction
    )
    try:
        _describe(study, spec, prep)
        with db.transaction(url) as conn:
            conn.execute(
                db.studies.insert().values(
                    study_name=spec.name,
                    spec_json=canonical_json(spec.raw),
                    spec_hash=spec.spec_hash(),
                    base_dir=spec.base_dir,
                    data_fp=prep.fingerprints.data,
                    split_fp=prep.fingerprints.split,
                    folds_fp=prep.fingerprints.folds,
                    n_trials=spec.n_trials,
                    versions_json=json.dumps(versions()),
                    created_at=dt.datetime.now(dt.UTC),
                )
            )
    except BaseException:
        optuna.delete_study(study_name=spec.name, storage=optuna_storage)
        raise
    return study, prep, load_record(url, spec.name)


def _describe(study: optuna.Study, spec: StudySpec, prep: data.Prepared) -> None:
    """Study user attrs that optuna-dashboard and Optuna scripts show."""
    study.set_user_attr("metric", spec.metric)
    study.set_user_attr("data", prep.table.origin)
    study.set_user_attr("task", prep.table.task)
    study.set_user_attr("folds", spec.cv.folds * spec.cv.repeats)
    study.set_user_attr("dev_rows", len(prep.dev))
    study.set_user_attr("test_rows_held_out", len(prep.test))


def make_sampler(spec: StudySpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    seed = derive_seed(spec.seed, 1_000_003, worker)
    name = spec.search.sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.training.max_epochs)
    if spec.search.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)


def value_of(trial: FrozenTrial) -> float:
    """A complete trial's value (−inf for a trial without one, so it sorts last)."""
    return float(trial.value) if trial.value is not None else float("-inf")


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@dataclass
class RunSummary:
    study: str
    finished: int
    budget: int
    ran: int
    best_value: float | None
    best_trial: int | None


class _Budget:
    """Stops the worker once the study holds `total` finished trials, or this run finished `cap`."""

    def __init__(self, total: int, cap: int | None) -> None:
        self.total, self.cap, self.ran = total, cap, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state in FINISHED:
            self.ran += 1
        if count_finished(study) >= self.total or (self.cap is not None and self.ran >= self.cap):
            study.stop()


class _FailureStreak:
    """Stops the worker after `limit` consecutive failed trials, keeping the last error."""

    def __init__(self, limit: int) -> None:
        self.limit, self.streak, self.last_error = limit, 0, ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            self.streak = 0
            return
        self.streak += 1
        self.last_error = describe_failure(trial)
        if self.streak >= self.limit:
            study.stop()


def describe_failure(trial: FrozenTrial) -> str:
    reason = trial.user_attrs.get("fail_reason", "exception")
    error = str(trial.user_attrs.get("error", "")).strip().splitlines()
    return f"{reason}: {error[-1] if error else 'no detail'}"


Progress = Callable[[optuna.Study, FrozenTrial], None]


def run(
    spec: StudySpec,
    url: str,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    worker: int = 0,
    progress: Progress | None = None,
) -> RunSummary:
    """Run trials until the study holds `spec.n_trials` finished ones (or this run's cap/timeout)."""
    study, prep, _ = create_or_resume(spec, url)
    done = count_finished(study)
    if done >= spec.n_trials:
        raise RefusedError(
            f"study {spec.name!r} already has {done} of its n_trials = {spec.n_trials} finished "
            "trials; raise n_trials in the study file to run more"
        )
    objective = Objective(spec, data.dev_set(prep))
    study = optuna.load_study(
        study_name=spec.name,
        storage=study._storage,
        sampler=make_sampler(spec, worker),
        pruner=make_pruner(spec),
    )
    budget, streak = _Budget(spec.n_trials, n_trials), _FailureStreak(spec.search.max_failures)
    callbacks: list[Progress] = [budget, streak, *([progress] if progress else [])]
    study.optimize(
        objective, catch=(Exception,), callbacks=callbacks, timeout=timeout, gc_after_trial=False
    )
    if streak.streak >= streak.limit:
        raise FailureStreakError(
            f"study {spec.name!r} stopped after {streak.streak} consecutive failed trials; "
            f"last error: {streak.last_error}"
        )
    return summarize(study, spec.n_trials, ran=budget.ran)


def summarize(study: optuna.Study, budget: int, *, ran: int = 0) -> RunSummary:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value or float("-inf")) if complete else None
    return RunSummary(
        study=study.study_name,
        finished=count_finished(study),
        budget=budget,
        ran=ran,
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
    )


def open_study(url: str, name: str) -> tuple[optuna.Study, Record]:
    """An existing study for reading (status, export, final); never creates a database."""
    optuna_storage = storage.open_storage(url, must_exist=True)
    rec = load_record(url, name)
    return optuna.load_study(study_name=name, storage=optuna_storage), rec
