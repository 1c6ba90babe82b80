"""Create or resume a study, and run a worker on it.

All input (study file, data, storage URL) is validated before the database is written, so a bad
input leaves nothing half-made. The study's record in `selector_studies` pins its spec hash and the
fingerprints of its data, split and folds; a run whose spec or data differ is refused with a diff.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sklearn
import sqlalchemy as sa
import torch

from selector import __version__, data, db, storage, worker
from selector.errors import RefusedError, StudyError
from selector.objective import Objective
from selector.spec import StudySpec, canonical_json, from_record, hashed_part
from selector.storage import Heartbeat

ATTR_SPEC, ATTR_BASE_DIR = "selector:spec", "selector:base_dir"
ATTR_FINGERPRINTS, ATTR_BUDGET = "selector:fingerprints", "selector:n_trials"


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
        study = optuna.load_study(study_name=spec.name, storage=optuna_storage)
        if rec.n_trials != spec.n_trials:
            _set_budget(url, study, spec.n_trials)
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
    except BaseException:
        optuna.delete_study(study_name=spec.name, storage=optuna_storage)
        raise
    return study, prep, load_record(url, spec.name)


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
    # what a worker on any machine (even through a gRPC proxy) needs to join
    study.set_user_attr(ATTR_SPEC, recorded(spec))
    study.set_user_attr(ATTR_BASE_DIR, spec.base_dir)
    study.set_user_attr(ATTR_FINGERPRINTS, prep.fingerprints.as_dict())
    study.set_user_attr(ATTR_BUDGET, spec.n_trials)


def _set_budget(url: str, study: optuna.Study, n_trials: int) -> None:
    with db.transaction(url) as conn:
        conn.execute(
            db.studies.update()
            .where(db.studies.c.study_name == study.study_name)
            .values(n_trials=n_trials)
        )
    study.set_user_attr(ATTR_BUDGET, n_trials)


def register_worker(url: str, name: str) -> int:
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
) -> worker.RunSummary:
    """Create or resume the study, then work on it in this process."""
    study, prep, _ = create_or_resume(spec, url)
    limit = budget_limit(study, spec.name, spec.n_trials, n_trials)
    objective = Objective(spec, data.dev_set(prep))
    return worker.work(
        spec,
        url,
        objective,
        worker=register_worker(url, spec.name),
        limit=limit,
        timeout=timeout,
        heartbeat=heartbeat,
        progress=progress,
    )


def budget_limit(study: optuna.Study, name: str, n_trials: int, cap: int | None) -> int:
    """How many finished trials this run aims for: the study's n_trials, or `cap` more than now."""
    done = worker.count(study)
    if done >= n_trials:
        raise RefusedError(
            f"study {name!r} already has {done} of its n_trials = {n_trials} finished trials; "
            "raise n_trials in the study file to run more"
        )
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
    study = _load(storage.open_storage(url, must_exist=True, heartbeat=heartbeat), url, name)
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
) -> worker.RunSummary:
    """`selector worker`: join an existing study and run trials until its budget is spent
    (or `n_trials` more are finished, or the study holds `limit` finished trials)."""
    joined = join(url, name, data_path=data_path, heartbeat=heartbeat)
    study = _load(storage.open_storage(url, must_exist=True, heartbeat=heartbeat), url, name)
    worker.reap_stale(study)
    if limit is None:
        limit = budget_limit(study, name, joined.n_trials, n_trials)
    objective = Objective(joined.spec, data.dev_set(joined.prep))
    return worker.work(
        joined.spec,
        url,
        objective,
        worker=register_worker(url, name),
        limit=limit,
        timeout=timeout,
        heartbeat=heartbeat,
        progress=progress,
    )


def _load(store: optuna.storages.BaseStorage, url: str, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store, False)]
        known = f"; studies here: {', '.join(names)}" if names else "; this storage has no studies"
        raise StudyError(f"no study {name!r} in {storage.mask(url)}{known}") from None


def open_study(url: str, name: str, *, reap: bool = False) -> tuple[optuna.Study, Record]:
    """An existing study for reading (status, export, final); never creates a database.
    With `reap`, trials whose worker went silent are failed as stale (and queued for a retry)."""
    optuna_storage = storage.open_storage(
        url, must_exist=True, heartbeat=Heartbeat() if reap else None
    )
    study = _load(optuna_storage, url, name)
    if reap:
        worker.reap_stale(study)
    return study, load_record(url, name)
