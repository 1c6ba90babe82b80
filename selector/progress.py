"""Progress of a run: a bar on a terminal, one line per trial otherwise."""

from __future__ import annotations

import sys
from types import TracebackType

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from selector.record import ATTR_BUDGET, FINISHED, TrialRecord, describe_failure


class Bar:
    """Counts finished trials towards the study's budget; failures are reported, not counted."""

    def __init__(self, total: int | None) -> None:
        self.total = total  # None: the study's n_trials, read at the first trial
        self.tty = sys.stderr.isatty()
        self.bar: tqdm | None = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, study: optuna.Study, trial: FrozenTrial) -> None:
        finished = study.get_trials(deepcopy=False, states=FINISHED)
        done = len(finished)
        if trial.state in FINISHED and trial.datetime_complete is not None:
            # several workers: trials are reported after they finish, so count those before it
            at = trial.datetime_complete
            done = sum(1 for t in finished if t.datetime_complete and t.datetime_complete <= at)
        if self.total is None:
            self.total = int(study.user_attrs.get(ATTR_BUDGET, 0)) or None
        line = self._line(trial)
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
        best = _best(study)
        if best is not None:
            self.bar.set_postfix_str(f"best {best:.4f}")

    @staticmethod
    def _line(trial: FrozenTrial) -> str:
        r = TrialRecord.from_trial(trial)
        if r.complete:
            return (
                f"trial {r.number}: {r.value:.4f} ± {r.cv_std:.4f} at epoch {r.best_epoch} "
                f"of {r.epochs_run} (train {r.train_score:.4f})"
            )
        if trial.state == TrialState.PRUNED:
            return f"trial {r.number}: pruned at epoch {r.pruned_at_epoch}"
        return f"trial {trial.number}: failed ({describe_failure(trial)})"


def _best(study: optuna.Study) -> float | None:
    try:
        return float(study.best_value)
    except ValueError:
        return None
