"""What `status`, `studies`, the report and the study note show: read-only views of the database.

`status` gathers a study's state once, typed (`StudyStatus`): its trials as records with their
diagnoses against the study as it is now, the choice, the expected test score of the choice and
the test set's state. It never writes: trials that look stale are shown, and left for the
workers (who know the heartbeat and grace they run with) to reap.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from selector import diagnose, metrics, record, selection, storage
from selector.diagnose import Diagnosis
from selector.record import FinalResult, TrialRecord
from selector.selection import Choice


@dataclass(frozen=True)
class TrialView:
    """A trial as the views show it: its record and, when complete, its diagnosis now."""

    record: TrialRecord
    diagnosis: Diagnosis | None

    def as_dict(self) -> dict[str, Any]:
        r, d = self.record, self.diagnosis
        scored = bool(r.fold_scores)
        return {
            "number": r.number,
            "state": r.state.name.lower(),
            "value": r.value,
            "cv_std": r.cv_std if scored else None,
            "train_score": r.train_score if scored else None,
            "gap": r.gap if scored else None,
            "best_epoch": r.best_epoch,
            "epochs_run": r.epochs_run,
            "n_params": r.n_params,
            "diagnosis": d.label if d else None,
            "fit": d.fit if d else None,
            "gradients": d.gradients if d else None,
            "stopped_while_improving": d.still_improving if d else None,
            "fail_reason": r.fail_reason,
            "pruned_at_epoch": r.pruned_at_epoch,
            "params": r.params,
        }


@dataclass(frozen=True, repr=False)
class StudyStatus:
    """A study's state as `selector status` shows it: printed (`str`, or the value of a notebook
    cell) it is that text; `repr` is one line."""

    study: str
    storage: str
    metric: str
    data: str | None
    n_trials: int
    folds: int | None
    dev_rows: int | None
    test_rows: int | None
    baseline: float | None
    data_notes: list[str]
    silent: list[int]  # running trials silent past their grace: their worker looks lost
    states: dict[str, int]
    failures: dict[str, int]
    trials: list[TrialView]
    choice: Choice | None
    estimate: Any | None  # selector.estimate.Estimate
    final: FinalResult | None
    ranked: list[TrialView] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.states["complete"] + self.states["pruned"]

    @property
    def best(self) -> TrialView | None:
        return self.ranked[0] if self.ranked else None

    @property
    def chosen(self) -> TrialView | None:
        if self.choice is None:
            return None
        return next((v for v in self.trials if v.record.number == self.choice.trial), None)

    @property
    def lockbox(self) -> str:
        if self.final is None:
            return "no test set" if self.test_rows == 0 else "sealed"
        return self.final.lockbox_state

    def __str__(self) -> str:
        return status_text(self)

    def __repr__(self) -> str:
        chosen = f"trial {self.choice.trial}" if self.choice is not None else "none"
        return (
            f"<StudyStatus {self.study!r}: {self.finished}/{self.n_trials} trials finished, "
            f"chosen {chosen}, test set {self.lockbox}>"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's display
        printer.text(repr(self) if cycle else str(self))

    def counts(self, what: str) -> Counter[str]:
        """How many complete trials carry each fit label (`fit`) or gradient label."""
        views = [v for v in self.ranked if v.diagnosis is not None]
        return Counter(str(getattr(v.diagnosis, what)) for v in views)

    def as_dict(self, top: int | None = None) -> dict[str, Any]:
        est = self.estimate
        return {
            "study": self.study,
            "storage": self.storage,
            "metric": self.metric,
            "direction": "maximize",
            "data": self.data,
            "n_trials": self.n_trials,
            "finished": self.finished,
            "states": self.states,
            "failures": self.failures,
            "silent_running": self.silent,
            "baseline": self.baseline,
            "data_notes": self.data_notes,
            "best": self.best.as_dict() if self.best else None,
            "choice": self.choice.as_dict() if self.choice else None,
            "estimate": est.as_dict() if est is not None else None,
            "test_set": {**(self.final.as_dict() if self.final else {}), "state": self.lockbox},
            "top": [v.as_dict() for v in self.ranked[:top]] if top is not None else None,
            "trials": [v.as_dict() for v in self.trials],
        }


def _counts(records: list[TrialRecord]) -> tuple[dict[str, int], dict[str, int]]:
    states = {state.name.lower(): 0 for state in TrialState}
    failures: dict[str, int] = {}
    for r in records:
        states[r.state.name.lower()] += 1
        if r.state == TrialState.FAIL:
            failures[str(r.fail_reason)] = failures.get(str(r.fail_reason), 0) + 1
    return states, failures


def status(url: str, name: str, *, estimate: bool = True) -> StudyStatus:
    """The study's state, read once."""
    attrs, records = record.read_trials(url, name)
    rec = record.load_record(url, name)
    baseline = attrs.get(record.ATTR_BASELINE)
    labels = diagnose.of_study(
        records, metric=rec.spec.metric, baseline=baseline, max_epochs=rec.spec.training.max_epochs
    )
    views = [TrialView(r, labels.get(r.number)) for r in records]
    by_number = {v.record.number: v for v in views}
    states, failures = _counts(records)
    final = record.stored_final(url, name) if not storage.is_grpc(url) else None
    choice = selection.current(url, name, records, final)
    expected = (
        selection.estimate(url, rec, records, choice.rule)
        if estimate and choice is not None
        else None
    )
    return StudyStatus(
        study=name,
        storage=storage.mask(url),
        metric=rec.spec.metric,
        data=attrs.get("data"),
        n_trials=rec.n_trials,
        folds=attrs.get("folds"),
        dev_rows=attrs.get("dev_rows"),
        test_rows=attrs.get("test_rows_held_out"),
        baseline=baseline,
        data_notes=list(record.data_notes(attrs)),
        silent=record.silent_trials(url, name) if states["running"] else [],
        states=states,
        failures=failures,
        trials=views,
        choice=choice,
        estimate=expected,
        final=final,
        ranked=[by_number[r.number] for r in record.complete(records)],
    )


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def estimate_line(st: StudyStatus) -> str:
    """The expected test score of the choice beside its raw CV score (and the test score once
    evaluated): one sentence every view shows."""
    est, chosen = st.estimate, st.chosen
    if chosen is None:
        return "no complete trial yet"
    m = st.metric
    raw = f"CV {metrics.shown(m, chosen.record.value)}"
    if est is None:
        expected = "expected test score unavailable (no out-of-fold predictions stored)"
    else:
        expected = (
            f"expected test {metrics.shown_value(m, est.value)} "
            f"[90% {metrics.shown_range(m, est.low, est.high)}] "
            f"(bias-corrected over {est.n_candidates} trials)"
        )
    test = ""
    if st.final is not None and st.final.test_score is not None:
        test = f"; test {metrics.shown_value(m, st.final.test_score)}"
    return f"{raw}, {expected}{test}"


def status_text(st: StudyStatus, top: int = 5) -> str:
    s = st.states
    lines = [
        f"study      {st.study}  ({st.storage})",
        f"data       {st.data}   metric {st.metric} (maximize)",
        *(f"           note: {n}" for n in st.data_notes),
        f"trials     {st.finished}/{st.n_trials} finished: {s['complete']} complete, "
        f"{s['pruned']} pruned, {s['fail']} failed, {s['running']} running",
    ]
    if st.failures:
        lines.append("failures   " + ", ".join(f"{k} {v}" for k, v in st.failures.items()))
    if st.silent:
        shown = ", ".join(str(n) for n in st.silent)
        lines.append(
            f"silent     trial{'s' if len(st.silent) > 1 else ''} {shown}: no heartbeat within "
            "the grace its worker runs with (the worker looks lost); the next worker reaps and "
            "retries it"
        )
    if st.choice is not None:
        lines.append(f"chosen     {st.choice.describe()}")
        lines.append(f"estimate   {estimate_line(st)}")
    lines.append("test set   " + lockbox_line(st))
    if st.ranked and top:
        lines += [
            "",
            f"{'trial':>5}  {'cv mean':>8}  {'± std':>7}  {'train':>7}  {'gap':>7}  "
            f"{'epoch':>5}  {'params':>8}  diagnosis",
        ]
        for v in st.ranked[:top]:
            r = v.record
            lines.append(
                f"{r.number:>5}  {_fmt(r.value):>8}  {_fmt(r.cv_std):>7}  "
                f"{_fmt(r.train_score):>7}  {_fmt(r.gap, '+.4f'):>7}  "
                f"{r.best_epoch or '-':>5}  {r.n_params or '-':>8}  "
                f"{v.diagnosis.label if v.diagnosis else '-'}"
            )
    return "\n".join(lines)


def lockbox_line(st: StudyStatus) -> str:
    f = st.final
    if f is None and st.test_rows == 0:
        return "none: the study holds back no test rows (test_size = 0)"
    if f is None:
        return "sealed: not opened yet; `selector final` evaluates it, once"
    if f.state != "finished":
        return f"evaluation started, not finished (claimed at {record.shown_time(f.claimed_at)})"
    return (
        f"evaluated at {record.shown_time(f.finished_at)}: {metrics.shown(f.metric, f.test_score)} "
        f"on {f.test_rows} rows "
        f"(trial {f.trial}, rule {f.rule})"
    )


def studies(url: str) -> list[dict[str, Any]]:
    out = []
    for s in record.study_overviews(url):
        rec = record.find_record(url, s.name)
        final = record.stored_final(url, s.name) if rec else None
        out.append(
            {
                "study": s.name,
                "trials": s.trials,
                "best": s.best,
                "metric": rec.spec.metric if rec else None,
                "n_trials": rec.n_trials if rec else None,
                "test_set": (
                    ("sealed" if final is None else final.lockbox_state)
                    if rec
                    else "not a selector study"
                ),
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
