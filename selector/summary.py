"""What `status` and `studies` show: read-only views of the database."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from selector import final, storage, study, worker


def _lockbox(url: str, name: str) -> dict[str, Any]:
    prev = final.stored(url, name)
    if prev is None:
        return {"state": "sealed"}
    state = "evaluated" if prev.state == "finished" else "evaluation started, not finished"
    return {**prev.as_dict(), "state": state}


def _trial_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    return {
        "trial": t.number,
        "value": t.value,
        "cv_std": a.get("cv_std"),
        "train_score": a.get("train_score"),
        "gap": a.get("gap"),
        "best_epoch": a.get("best_epoch"),
        "diagnosis": a.get("diagnosis"),
        "gradients": a.get("gradient_health"),
        "n_params": a.get("n_params"),
        "params": t.params,
    }


def status(url: str, name: str, *, top: int = 5, reap: bool = False) -> dict[str, Any]:
    """The study's state; with `reap`, trials whose worker went silent are failed first."""
    s, rec = study.open_study(url, name, reap=reap)
    trials = s.get_trials(deepcopy=False)
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -worker.value_of(t)
    )  # type: ignore[arg-type]
    failures: dict[str, int] = {}
    for t in trials:
        if t.state == TrialState.FAIL:
            reason = worker.failure_reason(t)
            failures[reason] = failures.get(reason, 0) + 1
    return {
        "study": name,
        "storage": storage.mask(url),
        "metric": rec.spec.metric,
        "direction": rec.spec.study_direction,
        "data": s.user_attrs.get("data"),
        "n_trials": rec.n_trials,
        "finished": counts["complete"] + counts["pruned"],
        "states": counts,
        "failures": failures,
        "best": _trial_row(complete[0]) if complete else None,
        "top": [_trial_row(t) for t in complete[:top]],
        "test_set": _lockbox(url, name),
    }


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def status_text(info: dict[str, Any]) -> str:
    st = info["states"]
    lines = [
        f"study      {info['study']}  ({info['storage']})",
        f"data       {info['data']}   metric {info['metric']} ({info['direction']})",
        f"trials     {info['finished']}/{info['n_trials']} finished: {st['complete']} complete, "
        f"{st['pruned']} pruned, {st['fail']} failed, {st['running']} running",
    ]
    if info["failures"]:
        lines.append("failures   " + ", ".join(f"{k} {v}" for k, v in info["failures"].items()))
    box = info["test_set"]
    lines.append(
        "test set   "
        + (
            f"evaluated: {box['metric']} = {_fmt(box['test_score'])} "
            f"(trial {box['trial']}, {box['finished_at']})"
            if box["state"] == "evaluated"
            else box["state"]
        )
    )
    if info["top"]:
        lines += [
            "",
            f"{'trial':>5}  {'cv mean':>8}  {'± std':>7}  {'train':>7}  {'gap':>7}  "
            f"{'epoch':>5}  {'params':>8}  diagnosis",
        ]
        for r in info["top"]:
            lines.append(
                f"{r['trial']:>5}  {_fmt(r['value']):>8}  {_fmt(r['cv_std']):>7}  "
                f"{_fmt(r['train_score']):>7}  {_fmt(r['gap'], '+.4f'):>7}  "
                f"{r['best_epoch'] or '-':>5}  {r['n_params'] or '-':>8}  "
                f"{r['diagnosis']}, gradients {r['gradients']}"
            )
    return "\n".join(lines)


def studies(url: str) -> list[dict[str, Any]]:
    optuna_storage = storage.open_storage(url, must_exist=True)
    out = []
    for s in optuna.get_all_study_summaries(optuna_storage, include_best_trial=True):
        rec = study.find_record(url, s.study_name)
        out.append(
            {
                "study": s.study_name,
                "trials": s.n_trials,
                "best": s.best_trial.value if s.best_trial else None,
                "metric": rec.spec.metric if rec else None,
                "n_trials": rec.n_trials if rec else None,
                "test_set": _lockbox(url, s.study_name)["state"] if rec else "not a selector study",
            }
        )
    return out


def studies_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no studies"
    lines = [f"{'study':<30} {'trials':>7} {'budget':>7} {'best':>9}  metric / test set"]
    for r in rows:
        lines.append(
            f"{r['study']:<30} {r['trials']:>7} {r['n_trials'] or '-':>7} "
            f"{_fmt(r['best']):>9}  {r['metric'] or '-'} / {r['test_set']}"
        )
    return "\n".join(lines)
