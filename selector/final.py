"""The lockbox: the held-out test set is evaluated at most once per study.

The study's row in `selector_final` is inserted (claimed) in its own transaction before any test
row is read; the primary key makes a second claim fail, even from a concurrent process. Then the
chosen config is refit on all dev rows for its recorded number of epochs and scored once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch

from selector import artifact, data, db, engine, export, metrics, storage
from selector.errors import LockboxError, StudyError
from selector.space import TrialConfig
from selector.study import Record, open_study

FINAL_SEED_TAG = 2**31 - 1


@dataclass
class FinalResult:
    study: str
    state: str
    rule: str
    trial: int
    metric: str
    cv_score: float | None
    test_score: float | None
    test_rows: int | None
    claimed_at: str
    finished_at: str | None
    artifact: str | None
    resumed_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(row: Any) -> FinalResult:
    return FinalResult(
        study=row.study_name,
        state=row.state,
        rule=row.rule,
        trial=row.trial_number,
        metric=row.metric,
        cv_score=row.cv_score,
        test_score=row.test_score,
        test_rows=row.test_rows,
        claimed_at=row.claimed_at.isoformat(),
        finished_at=row.finished_at.isoformat() if row.finished_at else None,
        artifact=row.artifact,
        resumed_at=row.resumed_at.isoformat() if row.resumed_at else None,
    )


def stored(url: str, name: str) -> FinalResult | None:
    with db.transaction(url) as conn:
        row = conn.execute(sa.select(db.final).where(db.final.c.study_name == name)).first()
    return None if row is None else _result(row)


def _claim(url: str, name: str, rule: str, trial: int, metric: str, cv: float) -> None:
    try:
        with db.transaction(url) as conn:
            conn.execute(
                db.final.insert().values(
                    study_name=name,
                    state="claimed",
                    claimed_at=dt.datetime.now(dt.UTC),
                    claimed_by=f"{socket.gethostname()}:{os.getpid()}",
                    rule=rule,
                    trial_number=trial,
                    metric=metric,
                    cv_score=cv,
                )
            )
    except sa.exc.IntegrityError:
        raise LockboxError(refusal(stored(url, name))) from None


def _take_over(url: str, name: str) -> tuple[export.Rule, int]:
    """Take over a claim whose evaluation never finished; only one process can."""
    prev = stored(url, name)
    if prev is None:
        raise LockboxError(
            f"study {name!r}: no evaluation was started; run `selector final` "
            "without --resume-crashed"
        )
    with db.transaction(url) as conn:
        taken = conn.execute(
            db.final.update()
            .where(
                db.final.c.study_name == name,
                db.final.c.state == "claimed",
                db.final.c.resumed_at.is_(None),
            )
            .values(
                resumed_at=dt.datetime.now(dt.UTC),
                claimed_by=f"{socket.gethostname()}:{os.getpid()} (resumed)",
            )
        ).rowcount
    if taken != 1:
        raise LockboxError(
            refusal(stored(url, name))
            if prev.state == "finished"
            else f"study {name!r}: the crashed evaluation was already resumed once"
        )
    return prev.rule, prev.trial  # type: ignore[return-value]


def refusal(prev: FinalResult | None) -> str:
    if prev is None:  # pragma: no cover - the row that blocked the claim cannot vanish
        return "the test set was already claimed"
    if prev.state == "finished":
        return (
            f"the test set of study {prev.study!r} was already evaluated at {prev.finished_at}: "
            f"{prev.metric} = {prev.test_score:.4f} (trial {prev.trial}, rule {prev.rule}); "
            "it is evaluated only once"
        )
    return (
        f"the test set of study {prev.study!r} was claimed at {prev.claimed_at} but the "
        "evaluation did not finish (evaluation started, not finished); it will not be evaluated "
        "silently a second time: `selector final --resume-crashed` finishes it, on the record"
    )


def artifact_dir(url: str, name: str) -> Path:
    path = storage.sqlite_path(url)
    base = path.parent if path is not None else Path.cwd()
    return base / "selector-artifacts" / name


def evaluate(
    url: str, name: str, rule: export.Rule = "best", *, resume_crashed: bool = False
) -> FinalResult:
    """Claim the lockbox, refit the chosen config on all dev rows, score the test rows once.

    `resume_crashed` finishes an evaluation whose process died after its claim (explicitly, once,
    recorded in `resumed_at`); it never re-opens a finished one."""
    study, rec = open_study(url, name)
    if resume_crashed:
        rule, number = _take_over(url, name)
        trial = study.trials[number]
    else:
        trial = export.choose(study, rule)
    prep = data.prepare(rec.spec)
    if prep.fingerprints.as_dict() != rec.fingerprints:
        raise StudyError(
            f"study {name!r}: the data differ from when the study was created "
            f"({prep.table.origin}); the test set cannot be evaluated on other data"
        )
    if not resume_crashed:
        _claim(url, name, rule, trial.number, rec.spec.metric, float(trial.value))  # type: ignore[arg-type]
    refit = _refit_and_score(rec, prep, trial.user_attrs)
    meta = _meta(rec, prep, refit, trial.number, trial.user_attrs)
    out = _save(url, name, refit, meta, export.document(study, rec, rule, url))
    with db.transaction(url) as conn:
        conn.execute(
            db.final.update()
            .where(db.final.c.study_name == name)
            .values(
                state="finished",
                finished_at=dt.datetime.now(dt.UTC),
                test_score=refit.score,
                test_rows=refit.test_rows,
                artifact=str(out),
            )
        )
    result = stored(url, name)
    assert result is not None
    return result


@dataclass
class Refit:
    score: float
    test_rows: int
    model: torch.nn.Module
    pre: artifact.Preprocess
    y_mean: float
    y_std: float


def _refit_and_score(rec: Record, prep: data.Prepared, attrs: dict[str, Any]) -> Refit:
    dev, test = data.dev_set(prep), data.test_set(prep)
    config = TrialConfig(**attrs["config"])
    pre, (x_dev, x_test) = data.fit_transform(dev.X, test.X)
    y_dev = dev.y.astype("float32") if dev.task == "regression" else dev.y
    mean, std = (
        (float(dev.y.mean()), float(dev.y.std()) or 1.0) if dev.task == "regression" else (0.0, 1.0)
    )
    fold = data.FoldData(
        x_dev,
        (y_dev - mean) / std if dev.task == "regression" else y_dev,
        x_test,
        test.y,
        mean,
        std,
    )
    model = engine.fit(
        config,
        fold,
        task=dev.task,
        n_classes=dev.n_classes,
        epochs=int(attrs["best_epoch"]),
        max_epochs=rec.spec.training.max_epochs,
        seed=engine.derive_seed(rec.spec.seed, FINAL_SEED_TAG),
        device=rec.spec.training.device,
    )
    x = torch.as_tensor(x_test, device=next(model.parameters()).device)
    pred = engine.predict(model, x, task=dev.task, y_mean=mean, y_std=std)
    metric = metrics.get(rec.spec.metric)
    score = engine.score(metric, test.y, pred, dev.n_classes)
    columns = [str(c) for c in dev.X.columns]
    return Refit(score, len(test.y), model, artifact.from_sklearn(pre, columns), mean, std)


def _meta(
    rec: Record, prep: data.Prepared, refit: Refit, trial: int, attrs: dict[str, Any]
) -> artifact.Meta:
    table, ds = prep.table, rec.spec.data
    return artifact.Meta(
        task=table.task,
        metric=rec.spec.metric,
        target=ds.target if ds.path is not None else "target",
        classes=list(table.classes),
        n_in=refit.pre.n_features,
        n_out=len(table.classes) if table.task == "classification" else 1,
        y_mean=refit.y_mean,
        y_std=refit.y_std,
        config=dict(attrs["config"]),
        study=rec.name,
        trial=trial,
    )


def _save(url: str, name: str, refit: Refit, meta: artifact.Meta, doc: dict[str, Any]) -> Path:
    """The refit model (weights, preprocessing, metadata: no pickled code) and its config."""
    out = artifact_dir(url, name)
    artifact.save(out, refit.model, refit.pre, meta)
    (out / "config.json").write_text(json.dumps(doc, indent=2, default=str))
    return out
