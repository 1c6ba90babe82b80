"""Progress of a run: a bar on a terminal or in a Jupyter notebook, one line per trial otherwise."""

from __future__ import annotations

import bisect
import datetime
import math
import sys
from collections.abc import Sequence
from types import TracebackType

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm  # a notebook widget in Jupyter (with ipywidgets), else the text bar

from selector.metrics import METRICS
from selector.record import (
    ATTR_BUDGET,
    FINISHED,
    FINISHED_READ_S,
    TrialRecord,
    describe_failure,
    finished_trials,
    one_read,
    study_best,
)

_NEVER = datetime.datetime.max  # sorts a trial without an end after those with one


def interactive() -> bool:
    """Whether a person watches the output live: stderr is a terminal, or this is a Jupyter
    kernel (whose stderr is a pipe, yet shows a bar redrawn in place)."""
    if sys.stderr.isatty():
        return True
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Bar:
    """Counts finished trials towards the study's budget; failures are reported, not counted."""

    def __init__(self, total: int | None) -> None:
        self.total = total  # None: the study's n_trials, read at the first trial
        self.tty = interactive()
        self.bar: tqdm | None = None
        self.perfect: tuple[float | None] | None = None  # read at the first trial

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with one_read(study, running=False, within=FINISHED_READ_S):
            self.update_all(study, [trial])

    __call__ = update  # a run's `progress` callback

    def update_all(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
        """Show `trials` (ended together, as a fused group's members), counting from one read
        of the study's finished trials (`record.finished_trials` where Optuna's cache holds
        them, read by the caller, at most `record.FINISHED_READ_S` ago): each counts those that
        finished before it, other workers' as read then (several workers report trials after
        they finish; members that end together share their time and count in the order of
        their numbers)."""
        index = finished_trials(study)
        if index is not None:
            ended = index.ended
        else:
            finished = study.get_trials(deepcopy=False, states=FINISHED)
            ended = sorted(
                (t.datetime_complete, t.number) for t in finished if t.datetime_complete is not None
            )
        best_val = study_best(study)[0]
        best = best_val if best_val > -math.inf else None
        if self.total is None:
            self.total = int(study.user_attrs.get(ATTR_BUDGET, 0)) or None
        # by when they ended; those that ended together by number
        for trial in sorted(trials, key=lambda t: (t.datetime_complete or _NEVER, t.number)):
            done = len(ended)
            if trial.state in FINISHED and trial.datetime_complete is not None:
                done = bisect.bisect_right(ended, (trial.datetime_complete, trial.number))
            self._show(study, trial, done, best)

    def _show(self, study: optuna.Study, trial: FrozenTrial, done: int, best: float | None) -> None:
        """`best`: the study's best score, as read for this line."""
        if self.perfect is None:
            self.perfect = (_perfect(study),)
        line = self._line(trial, self.perfect[0])
        if not self.tty:
            print(f"[{done}/{self.total}] {line}", file=sys.stderr, flush=True)
            return
        if self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=done - (trial.state in FINISHED),
                unit="trial",
                dynamic_ncols=True,
            )
        if trial.state in FINISHED:
            self.bar.update(1)
        else:
            self.bar.write(line)
        if best is not None:
            self.bar.set_postfix_str(f"best {best:.4f}")

    @staticmethod
    def _line(trial: FrozenTrial, perfect: float | None = None) -> str:
        """`perfect`: the study metric's perfect score (a trial reaching it stops there)."""
        r = TrialRecord.from_trial(trial)
        if r.complete:
            assert r.value is not None
            why = (
                ", stopped on a perfect score" if perfect is not None and r.value >= perfect else ""
            )
            return (
                f"trial {r.number}: {r.value:.4f} ± {r.cv_std:.4f} at epoch {r.best_epoch} "
                f"of {r.epochs_run}{why} (train {r.train_score:.4f})"
            )
        if trial.state == TrialState.PRUNED:
            return f"trial {r.number}: pruned at epoch {r.pruned_at_epoch}"
        return f"trial {trial.number}: failed ({describe_failure(trial)})"


def _perfect(study: optuna.Study) -> float | None:
    """The perfect score of the study's metric (`Metric.perfect`), None where it names none."""
    names = study.metric_names
    metric = METRICS.get(names[0]) if names else None
    return metric.perfect if metric is not None else None


class RefitBar:
    """The final refit's progress on stderr: one line saying what is refit, then, on a
    terminal, a bar of its epochs (nothing more where stderr is a file or a pipe)."""

    def __init__(self) -> None:
        self.tty = interactive()
        self.bar: tqdm | None = None

    def __enter__(self) -> RefitBar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()

    def start(self, trial: int, rows: int, epochs: int) -> None:
        print(
            f"refitting trial {trial} on all {rows} dev rows for {epochs} epochs...",
            file=sys.stderr,
            flush=True,
        )
        if self.tty:
            self.bar = tqdm(
                total=epochs, unit="epoch", leave=False, dynamic_ncols=True, file=sys.stderr
            )

    def epoch(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
