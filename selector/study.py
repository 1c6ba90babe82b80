"""Create or resume a study, and run a worker on it.

All input (study file, data, storage URL) is validated before the database is written, so a bad
input leaves nothing half-made. The study's record in `selector_studies` pins its spec hash and the
fingerprints of its data, split and folds; a run whose spec or data differ is refused with a diff.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sklearn
import torch

from selector import __version__, data, db, diagnose, metrics, record, stacked, storage, worker
from selector.errors import BudgetSpent, RefusedError, StudyError
from selector.objective import Objective
from selector.record import (
    ATTR_BASE_DIR,
    ATTR_BASELINE,
    ATTR_BUDGET,
    ATTR_FINGERPRINTS,
    ATTR_SPEC,
    StudyRecord,
)
from selector.spec import StudySpec, canonical_json, from_record, hashed_part
from selector.storage import Heartbeat


def versions() -> dict[str, str]:
    return {
        "selector": __version__,
        "optuna": optuna.__version__,
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {canonical_json(old)} -> {canonical_json(new)}"]


def _check_same(rec: StudyRecord, spec: StudySpec, prep: data.Prepared) -> None:
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


def create_or_resume(spec: StudySpec, url: str) -> tuple[optuna.Study, data.Prepared, StudyRecord]:
    """Validate data and storage, then create the study or check that it is the same study."""
    prep = data.prepare(spec)
    optuna_storage = storage.open_storage(url, must_exist=False)
    rec = record.find_record(url, spec.name)
    if rec is not None:
        _check_same(rec, spec, prep)
        study = optuna.load_study(study_name=spec.name, storage=optuna_storage)
        if rec.n_trials != spec.n_trials:
            _set_budget(url, study, spec.n_trials)
        return study, prep, record.load_record(url, spec.name)
    return _create(spec, url, optuna_storage, prep)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (a study created) held back, its warnings and errors not."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _create(
    spec: StudySpec, url: str, optuna_storage: optuna.storages.BaseStorage, prep: data.Prepared
) -> tuple[optuna.Study, data.Prepared, StudyRecord]:
    _check_fits(spec, prep)
    if spec.name in {s.study_name for s in optuna_storage.get_all_studies()}:  # no trial read
        raise StudyError(
            f"an Optuna study named {spec.name!r} already exists in {storage.mask(url)} but was not "
            "created by selector; choose another name"
        )
    with _quiet_optuna():  # selector says what it created (the command's output, the API's study)
        study = optuna.create_study(
            study_name=spec.name, storage=optuna_storage, direction=spec.study_direction
        )
    try:
        _describe(study, spec, prep)
        with db.transaction(url) as conn:
            conn.execute(
                db.studies.insert().values(
                    study_name=spec.name,
                    spec_json=canonical_json(recorded(spec)),
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
            conn.execute(db.oof.insert(), _dev_rows(spec, prep))
    except BaseException:
        optuna.delete_study(study_name=spec.name, storage=optuna_storage)
        raise
    return study, prep, record.load_record(url, spec.name)


def _check_fits(spec: StudySpec, prep: data.Prepared) -> None:
    """Refuse a search space whose smallest config cannot fit in this machine's memory: every
    trial would fail as `oom`."""
    dev = data.dev_set(prep)
    n_features = data.fold_data(dev, 0).X_train.shape[1]
    n_out = dev.n_classes if dev.task == "classification" else 1
    stacked.check_space_fits(spec, n_features, len(dev.y), n_out)


def _dev_rows(spec: StudySpec, prep: data.Prepared) -> list[dict[str, Any]]:
    """The dev targets and each dev row's fold (of the first repeat), beside the trials'
    out-of-fold predictions: what the bias-corrected estimate needs, without loading the data."""
    dev = data.dev_set(prep)
    fold_of_row = np.full(len(dev.y), -1, dtype=np.int16)
    for k, (_, val) in enumerate(dev.folds[: spec.cv.folds]):
        fold_of_row[val] = k
    kind = "labels" if dev.task == "classification" else "values"
    return [
        {"study_name": spec.name, "trial_number": n, "kind": kind, "data": record.pack_oof(a, kind)}
        for n, a, kind in (
            (record.TARGET_ROW, dev.y, kind),
            (record.FOLDS_ROW, fold_of_row, "labels"),
        )
    ]


def baseline_score(spec: StudySpec, prep: data.Prepared) -> float:
    """The mean CV score of the trivial predictor (`diagnose.trivial_scores`)."""
    dev = data.dev_set(prep)
    metric = metrics.get(spec.metric)
    pairs = [(dev.y[tr], dev.y[va]) for tr, va in dev.folds]
    scores = diagnose.trivial_scores(
        pairs, task=dev.task, n_classes=dev.n_classes, score=metric.of_predictions
    )
    return float(np.mean(scores))


def recorded(spec: StudySpec) -> dict[str, Any]:
    """The study file as recorded in the database: without `storage`, which may hold a password
    and says where the study lives, not what it is."""
    return {k: v for k, v in spec.raw.items() if k != "storage"}


def _describe(study: optuna.Study, spec: StudySpec, prep: data.Prepared) -> None:
    """Study user attrs that optuna-dashboard and Optuna scripts show."""
    study.set_user_attr("metric", spec.metric)
    study.set_user_attr("data", prep.table.origin)
    study.set_user_attr("task", prep.table.task)
    study.set_user_attr("folds", spec.cv.folds * spec.cv.repeats)
    study.set_user_attr("dev_rows", len(prep.dev))
    study.set_user_attr("test_rows_held_out", len(prep.test))
    study.set_user_attr("data_notes", list(prep.notes))
    # what a worker on any machine (even through a gRPC proxy) needs to join
    study.set_user_attr(ATTR_SPEC, recorded(spec))
    study.set_user_attr(ATTR_BASE_DIR, spec.base_dir)
    study.set_user_attr(ATTR_FINGERPRINTS, prep.fingerprints.as_dict())
    study.set_user_attr(ATTR_BUDGET, spec.n_trials)
    study.set_user_attr(ATTR_BASELINE, round(baseline_score(spec, prep), 6))
    with warnings.catch_warnings():  # experimental in Optuna; optuna-dashboard shows the name
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([spec.metric])


def _set_budget(url: str, study: optuna.Study, n_trials: int) -> None:
    with db.transaction(url) as conn:
        conn.execute(
            db.studies.update()
            .where(db.studies.c.study_name == study.study_name)
            .values(n_trials=n_trials)
        )
    study.set_user_attr(ATTR_BUDGET, n_trials)


def register_worker(url: str, name: str, heartbeat: Heartbeat | None = None) -> int:
    """A worker id unique in the study (it seeds the worker's sampler): from the database's
    counter, or random where the storage is a gRPC proxy."""
    if storage.is_grpc(url):
        return int.from_bytes(os.urandom(4), "big") >> 1
    with db.transaction(url) as conn:
        result = conn.execute(
            db.workers.insert().values(
                study_name=name,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=dt.datetime.now(dt.UTC),
                heartbeat_s=heartbeat.interval if heartbeat else None,
                grace_s=heartbeat.grace if heartbeat else None,
            )
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]


def run(
    spec: StudySpec,
    url: str,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    heartbeat: Heartbeat = Heartbeat(),
    progress: worker.Progress | None = None,
    fuse: int | str | None = None,
) -> record.RunSummary:
    """Create or resume the study, then work on it in this process (`fuse`: the most trials
    trained as one group, default the study file's `[search] fuse`)."""
    study, prep, _ = create_or_resume(spec, url)
    storage.retrying(lambda: record.refresh(study))  # the first read: selector's reader
    limit = storage.retrying(lambda: budget_limit(study, url, spec.n_trials, n_trials))
    objective = Objective(spec, data.dev_set(prep))
    return worker.work(
        spec,
        url,
        objective,
        worker=storage.retrying(lambda: register_worker(url, spec.name, heartbeat)),
        limit=limit,
        timeout=timeout,
        heartbeat=heartbeat,
        progress=progress,
        fuse=fuse,
    )


def check_not_sealed(url: str, study: optuna.Study) -> None:
    """After `final`, a study takes no more trials: its test score would no longer be an
    unbiased estimate of a new choice."""
    opened = record.test_set_opened(url, study)
    if opened is not None:
        raise RefusedError(
            f"study {study.study_name!r} is sealed: its test set was opened by `selector final` "
            f"at {record.shown_time(opened.claimed_at)} (trial {opened.trial}); a test score is "
            "unbiased for one choice only, so it runs no more trials — give the study file a new "
            "name to search again"
        )


def budget_limit(study: optuna.Study, url: str, n_trials: int, cap: int | None) -> int:
    """How many finished trials this run aims for: the study's n_trials, or `cap` more than now.
    Refused when the study is sealed (`RefusedError`) or its budget is spent (`BudgetSpent`)."""
    name = study.study_name
    check_not_sealed(url, study)
    done = record.count(study)
    if done >= n_trials:
        raise BudgetSpent(name, done, n_trials)
    return n_trials if cap is None else min(n_trials, done + cap)


@dataclass(frozen=True)
class Joined:
    spec: StudySpec
    prep: data.Prepared
    n_trials: int


def join(
    url: str, name: str, *, data_path: str | None = None, heartbeat: Heartbeat | None = None
) -> Joined:
    """What a worker on any machine needs, from the study itself: the recorded study file, and
    data whose fingerprints match the study's (checked here)."""
    study = record.load_study(
        storage.open_storage(url, must_exist=True, heartbeat=heartbeat), url, name
    )
    attrs = study.user_attrs
    if ATTR_SPEC not in attrs:
        raise StudyError(f"study {name!r} in {storage.mask(url)} was not created by selector")
    raw = dict(attrs[ATTR_SPEC])
    if data_path is not None:
        if "path" not in raw["data"]:
            raise StudyError(
                f"study {name!r} uses {raw['data'].get('source')}; --data is for "
                "studies whose data is a file"
            )
        raw["data"] = {**raw["data"], "path": str(Path(data_path).resolve())}
    spec = from_record(raw, attrs[ATTR_BASE_DIR], origin=f"study {name!r} (recorded spec)")
    prep = data.prepare(spec)
    changed = [
        k for k, v in attrs[ATTR_FINGERPRINTS].items() if prep.fingerprints.as_dict()[k] != v
    ]
    if changed:
        raise StudyError(
            f"study {name!r}: this worker's {'/'.join(changed)} differ from the study's "
            f"({prep.table.origin}); a worker must see the same data and folds as every other"
        )
    return Joined(spec, prep, int(attrs[ATTR_BUDGET]))


def work(
    url: str,
    name: str,
    *,
    data_path: str | None = None,
    n_trials: int | None = None,
    limit: int | None = None,
    timeout: float | None = None,
    heartbeat: Heartbeat = Heartbeat(),
    progress: worker.Progress | None = None,
    fuse: int | str | None = None,
) -> record.RunSummary:
    """`selector worker`: join an existing study and run trials until its budget is spent
    (or `n_trials` more are finished, or the study holds `limit` finished trials)."""
    # a worker joins a running study: a connection lost while it starts is retried, as
    # everything it does later is
    joined = storage.retrying(lambda: join(url, name, data_path=data_path, heartbeat=heartbeat))
    study = storage.retrying(
        lambda: record.load_study(
            storage.open_storage(url, must_exist=True, heartbeat=heartbeat), url, name
        )
    )
    storage.retrying(lambda: record.refresh(study))  # the first read: selector's reader
    storage.retrying(lambda: worker.reap_stale(study))
    if limit is None:
        limit = storage.retrying(lambda: budget_limit(study, url, joined.n_trials, n_trials))
    objective = Objective(joined.spec, data.dev_set(joined.prep))
    return worker.work(
        joined.spec,
        url,
        objective,
        worker=storage.retrying(lambda: register_worker(url, name, heartbeat)),
        limit=limit,
        timeout=timeout,
        heartbeat=heartbeat,
        progress=progress,
        fuse=fuse,
    )
