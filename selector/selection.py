"""Which trial the study ships: the rules, the recorded choice, and the estimate of its test score.

One chosen trial from export to predict: `export` records its choice (rule and trial) when it
makes it, `final` evaluates the recorded choice (or chooses anew with `--rule`, before the test
set is opened), and once the test set is open the evaluated trial *is* the choice. `current` is
the one function every view (status, export, report, the study note, predict) asks.

Before the test set is opened, the chosen trial's *expected test score* is the bootstrap
bias-corrected CV estimate (`selector.estimate`) over the stored out-of-fold predictions of the
top trials: the best mean CV score of many trials is a maximum, and optimistic.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa

from selector import db, storage
from selector.errors import RefusedError, SelectorError
from selector.record import (
    FOLDS_ROW,
    TARGET_ROW,
    FinalResult,
    StudyRecord,
    TrialRecord,
    complete,
    read_oof,
    shown_time,
    stored_final,
)

Rule = Literal["best", "one-se"]
RULES: tuple[Rule, ...] = ("best", "one-se")
RULE_HELP = (
    "best: the highest mean CV score; one-se: the simplest trial (fewest parameters, then "
    "fewest epochs) whose mean CV score is within one standard error of the best's"
)


def check_rule(rule: str | None) -> None:
    """A rule given by name (the Python API's, which no type check guards) must be one of
    `RULES`: an unknown one is refused before anything is chosen, recorded or opened."""
    if rule is not None and rule not in RULES:
        raise SelectorError(f"rule: unknown value {rule!r}; use one of {', '.join(RULES)}")


# Candidates of the bias-corrected estimate: the top trials by mean CV score. A trial further
# down almost never wins a bootstrap sample's selection.
TOP_CANDIDATES = 100
# Bootstrap samples of the estimate; every view uses the same number and seed, so all show the
# same value.
N_BOOT = 500


def choose(records: list[TrialRecord], rule: Rule, study: str = "") -> TrialRecord:
    """The trial the rule picks among the complete trials."""
    done = complete(records)
    if not done:
        raise RefusedError(f"study {study!r} has no complete trial yet; run `selector run` first")
    best = done[0]
    if rule == "best":
        return best
    floor = float(best.value) - best.standard_error  # type: ignore[arg-type]
    near = [r for r in done if float(r.value) >= floor]  # type: ignore[arg-type]
    return min(near, key=lambda r: (r.n_params or 0, r.best_epoch or 0, -float(r.value)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Choice:
    """A chosen trial and how it was chosen: `by` is "final" (evaluated on the test set),
    "export" (recorded when exported), or None (what the rule picks now, not recorded)."""

    rule: Rule
    trial: int
    by: str | None = None
    at: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.by == "final"

    def describe(self) -> str:
        how = {
            "final": "evaluated on the test set",
            "export": f"recorded by export at {shown_time(self.at)}",
            None: "not recorded yet",
        }.get(self.by, f"recorded by {self.by} at {shown_time(self.at)}")
        return f"trial {self.trial} (rule {self.rule}, {how})"

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "trial": self.trial, "by": self.by, "at": self.at}


def recorded(url: str, name: str) -> Choice | None:
    row = db.read_one(url, sa.select(db.choice).where(db.choice.c.study_name == name))
    if row is None:
        return None
    return Choice(row.rule, int(row.trial_number), row.chosen_by, row.chosen_at.isoformat())


def record_choice(url: str, name: str, rule: Rule, trial: int, by: str) -> Choice:
    """Record the study's choice (replacing an earlier one); refused once the test set is open."""
    prev = stored_final(url, name)
    if prev is not None and (prev.trial != trial or prev.rule != rule):
        raise RefusedError(
            f"study {name!r}: the test set was opened for trial {prev.trial} (rule {prev.rule}); "
            f"choosing trial {trial} (rule {rule}) now would ship a model without an unbiased "
            "test score — create a new study to choose again"
        )
    now = dt.datetime.now(dt.UTC)
    with db.transaction(url) as conn:
        conn.execute(sa.delete(db.choice).where(db.choice.c.study_name == name))
        conn.execute(
            db.choice.insert().values(
                study_name=name, rule=rule, trial_number=trial, chosen_at=now, chosen_by=by
            )
        )
    return Choice(rule, trial, by, now.isoformat())


def current(
    url: str, name: str, records: list[TrialRecord], final: FinalResult | None = None
) -> Choice | None:
    """The study's choice now: the trial evaluated on the test set (`final`, read here when not
    given), else the recorded choice, else what rule `best` picks (not recorded); None before
    any complete trial."""
    prev = final or (stored_final(url, name) if not storage.is_grpc(url) else None)
    if prev is not None:
        return Choice(prev.rule, prev.trial, "final", prev.claimed_at)  # type: ignore[arg-type]
    chosen = recorded(url, name) if not storage.is_grpc(url) else None
    if chosen is not None:
        return chosen
    done = complete(records)
    return Choice("best", choose(done, "best").number) if done else None


# --- the expected test score ----------------------------------------------------------------


def estimate(
    url: str, rec: StudyRecord, records: list[TrialRecord], rule: Rule, *, n_boot: int = N_BOOT
) -> Any | None:
    """The bias-corrected estimate (`selector.estimate.Estimate`) of the test score of the trial
    `rule` picks; None without stored out-of-fold predictions (a gRPC proxy, or no complete
    trial yet)."""
    from selector.estimate import Candidate, bbc_cv

    top = complete(records)[:TOP_CANDIDATES]
    if not top or storage.is_grpc(url):
        return None
    stored = read_oof(url, rec.name, [TARGET_ROW, FOLDS_ROW, *(r.number for r in top)])
    if TARGET_ROW not in stored or FOLDS_ROW not in stored:
        return None
    y, fold = stored.pop(TARGET_ROW), stored.pop(FOLDS_ROW).astype(np.int64)
    candidates = [
        Candidate(r.number, stored[r.number], r.n_params or 0, r.best_epoch or 0)
        for r in top
        if r.number in stored
    ]
    if not candidates:
        return None
    keep = fold >= 0  # rows outside the first repeat's folds (none without groups) are left out
    candidates = [Candidate(c.trial, c.oof[keep], c.n_params, c.best_epoch) for c in candidates]
    seed = rec.spec.seed
    return bbc_cv(
        candidates, y[keep], fold[keep], rec.spec.metric, rule=rule, n_boot=n_boot, seed=seed
    )
