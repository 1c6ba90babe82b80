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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
import sqlalchemy as sa
import torch

from selector import artifact, data, db, engine, export, metrics, record, selection, storage
from selector.errors import LockboxError, RefusedError, StudyError
from selector.metrics import Task
from selector.model import MLP
from selector.record import FinalResult, StudyRecord, TrialRecord, stored_final
from selector.selection import Choice, Rule
from selector.space import TrialConfig
from selector.spec import StudySpec

FINAL_SEED_TAG = 2**31 - 1


def _claim(study: optuna.Study, url: str, rule: str, trial: int, metric: str, cv: float) -> None:
    """Claim the study's test set: its row in selector_final (one only, by the primary key),
    then the same claim marked in the study itself (`record.mark_opened`), where workers
    through a gRPC proxy read it. Both before any test row is read."""
    name, now = study.study_name, dt.datetime.now(dt.UTC)
    try:
        with db.transaction(url) as conn:
            conn.execute(
                db.final.insert().values(
                    study_name=name,
                    state="claimed",
                    claimed_at=now,
                    claimed_by=f"{socket.gethostname()}:{os.getpid()}",
                    rule=rule,
                    trial_number=trial,
                    metric=metric,
                    cv_score=cv,
                )
            )
    except sa.exc.IntegrityError:
        raise LockboxError(refusal(stored_final(url, name))) from None
    record.mark_opened(study, record.Opened(now.isoformat(), trial))


def _take_over(study: optuna.Study, url: str) -> Choice:
    """Take over a claim whose evaluation never finished; only one process can. The claim is
    marked in the study again, in case its process died before it marked it."""
    name = study.study_name
    prev = stored_final(url, name)
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
            refusal(stored_final(url, name))
            if prev.state == "finished"
            else f"study {name!r}: the crashed evaluation was already resumed once"
        )
    record.mark_opened(study, record.Opened(prev.claimed_at, prev.trial))
    return Choice(prev.rule, prev.trial, "final", prev.claimed_at)  # type: ignore[arg-type]


def refusal(prev: FinalResult | None) -> str:
    if prev is None:  # pragma: no cover - the row that blocked the claim cannot vanish
        return "the test set was already claimed"
    if prev.state == "finished":
        return (
            f"the test set of study {prev.study!r} was already evaluated at "
            f"{record.shown_time(prev.finished_at)}: "
            f"{metrics.shown(prev.metric, prev.test_score)} (trial {prev.trial}, rule {prev.rule}); "
            "it is evaluated only once"
        )
    return (
        f"the test set of study {prev.study!r} was claimed at {record.shown_time(prev.claimed_at)} "
        "but the "
        "evaluation did not finish (evaluation started, not finished); it will not be evaluated "
        "silently a second time: `selector final --resume-crashed` finishes it, on the record"
    )


def artifact_dir(url: str, name: str) -> Path:
    """Where `final` saves the study's model: `selector-artifacts/STUDY` beside a SQLite
    database, else in the current directory. A symbolic link planted at either level is refused
    (`StorageError`), never followed: call this before the test set is claimed."""
    path = storage.sqlite_path(url)
    base = path.parent if path is not None else Path.cwd()
    out = base / "selector-artifacts" / name
    artifact.check_directory(out.parent)
    artifact.check_directory(out)
    return out


class RefitProgress(Protocol):
    """Told what the refit does, which takes seconds to minutes: its trial, rows and epochs
    before it starts, then each epoch as it ends."""

    def start(self, trial: int, rows: int, epochs: int) -> None: ...

    def epoch(self, epoch: int) -> None: ...


@dataclass(frozen=True)
class Evaluated:
    """What `final` did: the stored result, the choice it evaluated, and a remark on it (a rule
    that would now pick another trial than the recorded choice)."""

    result: FinalResult
    choice: Choice
    remark: str | None = None


def check_budget_spent(study: optuna.Study, rec: StudyRecord) -> None:
    """The test set is opened only once the search is over: after it, no trial may run."""
    done = record.count(study)
    if done < rec.n_trials:
        raise RefusedError(
            f"study {rec.name!r} has {done} of its n_trials = {rec.n_trials} finished trials; "
            "opening the test set seals the study (no more trials), so finish the search first "
            "— or pass --early to evaluate the choice now and end the search here"
        )


def _choice(
    url: str, name: str, records: list[TrialRecord], rule: Rule | None
) -> tuple[Choice, str | None]:
    """The choice `final` evaluates: `rule` applied now (recorded), else the recorded choice,
    else rule `best` (recorded)."""
    chosen = selection.recorded(url, name)
    if rule is None and chosen is not None:
        now = selection.choose(records, chosen.rule, name).number
        remark = (
            None
            if now == chosen.trial
            else f"rule {chosen.rule} now picks trial {now} (trials finished after the export); "
            f"`selector final --rule {chosen.rule}` would evaluate that one instead"
        )
        return chosen, remark
    pick = selection.choose(records, rule or "best", name)
    return selection.record_choice(url, name, rule or "best", pick.number, "final"), None


def evaluate(
    url: str,
    name: str,
    rule: Rule | None = None,
    *,
    early: bool = False,
    resume_crashed: bool = False,
    progress: RefitProgress | None = None,
) -> Evaluated:
    """Claim the lockbox, refit the chosen trial's config on all dev rows, score the test rows
    once. The chosen trial is the study's recorded choice (`export` records it) unless `rule`
    chooses anew; refused while the budget is not spent unless `early`.

    `resume_crashed` finishes an evaluation whose process died after its claim (explicitly, once,
    recorded in `resumed_at`); it never re-opens a finished one. `progress` hears of the refit."""
    selection.check_rule(rule)
    study, rec = record.open_study(url, name)
    if rec.spec.data.test_size == 0:
        raise RefusedError(
            f"study {name!r} holds back no test set (data.test_size = 0): there is nothing to "
            "evaluate; its expected test score is in `selector status`"
        )
    records = record.trials(study)
    remark = None
    if resume_crashed:
        choice = _take_over(study, url)
    else:
        prev = stored_final(url, name)
        if prev is not None:
            raise LockboxError(refusal(prev))
        if not early:
            check_budget_spent(study, rec)
        choice, remark = _choice(url, name, records, rule)
    trial = next(r for r in records if r.number == choice.trial)
    prep = data.prepare(rec.spec)
    if prep.fingerprints.as_dict() != rec.fingerprints:
        raise StudyError(
            f"study {name!r}: the data differ from when the study was created "
            f"({prep.table.origin}); the test set cannot be evaluated on other data"
        )
    artifact_dir(url, name)  # a planted link is refused before the test set is claimed
    if not resume_crashed:
        _claim(study, url, choice.rule, trial.number, rec.spec.metric, float(trial.value))  # type: ignore[arg-type]
    refit = _refit_and_score(rec, prep, trial, progress)
    meta = _meta(rec, prep, refit, trial)
    doc = export.document(study, rec, url, Choice(choice.rule, trial.number, "final"), records)
    out = _save(url, name, refit, meta, doc)
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
    result = stored_final(url, name)
    assert result is not None
    full = {**doc, "test": result.as_dict()}
    artifact.write_file(out, "config.json", json.dumps(full, indent=2, default=str).encode())
    return Evaluated(result, choice, remark)


@dataclass
class Refit:
    score: float
    test_rows: int
    model: torch.nn.Module
    pre: artifact.Preprocess
    y_mean: float
    y_std: float
    config: TrialConfig


def refit(
    spec: StudySpec,
    config: TrialConfig,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    n_classes: int,
    epochs: int,
    on_epoch: Callable[[int], None] | None = None,
) -> tuple[MLP, float, float]:
    """`config` trained on all of the preprocessed rows `x`, `y` for `epochs` epochs with the
    final seed: what `final` fits on the dev rows (and the estimators on the rows they are
    given). Regression targets are standardised; returns the model and the target's mean and
    standard deviation (0 and 1 for classification)."""
    regression = task == "regression"
    mean, std = (float(y.mean()), float(y.std()) or 1.0) if regression else (0.0, 1.0)
    y_fit = ((y.astype(np.float32) - mean) / std).astype(np.float32) if regression else y
    model = engine.fit(
        config,
        data.FoldData(x, y_fit, x[:0], y[:0], mean, std),
        task=task,
        n_classes=n_classes,
        epochs=epochs,
        max_epochs=spec.training.max_epochs,
        seed=engine.derive_seed(spec.seed, FINAL_SEED_TAG),
        device=spec.training.device,
        on_epoch=on_epoch,
    )
    return model, mean, std


def _refit_and_score(
    rec: StudyRecord, prep: data.Prepared, trial: TrialRecord, progress: RefitProgress | None
) -> Refit:
    dev, test = data.dev_set(prep), data.test_set(prep)
    epochs = int(trial.best_epoch or 1)
    if progress is not None:
        progress.start(trial.number, len(dev.y), epochs)
    config = trial.config(rec.spec.space)
    pre, (x_dev, x_test) = data.fit_transform(dev.X, test.X)
    model, mean, std = refit(
        rec.spec,
        config,
        x_dev,
        dev.y,
        task=dev.task,
        n_classes=dev.n_classes,
        epochs=epochs,
        on_epoch=progress.epoch if progress is not None else None,
    )
    x = torch.as_tensor(x_test, device=next(model.parameters()).device)
    pred = engine.predict(model, x, task=dev.task, y_mean=mean, y_std=std)
    metric = metrics.get(rec.spec.metric)
    score = engine.score(metric, test.y, pred, dev.n_classes)
    columns = [str(c) for c in dev.X.columns]
    return Refit(score, len(test.y), model, artifact.from_sklearn(pre, columns), mean, std, config)


def _meta(rec: StudyRecord, prep: data.Prepared, refit: Refit, trial: TrialRecord) -> artifact.Meta:
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
        config=refit.config.as_dict(),
        study=rec.name,
        trial=trial.number,
    )


def _save(url: str, name: str, refit: Refit, meta: artifact.Meta, doc: dict[str, Any]) -> Path:
    """The refit model (weights, preprocessing, metadata: no pickled code) and its config."""
    out = artifact_dir(url, name)
    artifact.save(out, refit.model, refit.pre, meta)
    artifact.write_file(out, "config.json", json.dumps(doc, indent=2, default=str).encode())
    return out
