"""The error hierarchy and the reasons a trial can fail.

`SelectorError` and its children are "stop, tell the user" errors: the CLI prints their message on one
line and exits with `exit_code`. Trial-level errors (`TrialDiverged`, `TrialOutOfMemory`) only end
one trial; the study goes on.
"""

from __future__ import annotations

from typing import Literal

# `interrupted`: Ctrl-C; `terminated`: SIGTERM (a service manager, a container or a batch job
# stopped the worker); `stale`: the worker died or went silent (no reason was recorded).
FailReason = Literal["exception", "diverged", "oom", "interrupted", "terminated", "stale"]


class SelectorError(Exception):
    """A problem the user must fix; the message names the file, field or URL and what to do."""

    exit_code = 2


class SpecError(SelectorError):
    """The study file is malformed."""


class DataError(SelectorError):
    """The data set is missing, malformed or unusable for the study."""


class StorageError(SelectorError):
    """The storage URL is wrong or the database cannot be reached."""


class ConnectionLost(StorageError):
    """A database statement failed in a way a retry may get past: a connection dropped mid-use
    (a terminated backend, a restarted server) or a busy SQLite file. `storage.retrying` retries
    it; where nothing retries, it is the user's one-line message like any `StorageError`."""


class StudyError(SelectorError):
    """The study does not exist, or its recorded spec or data differ from what is given."""


class RefusedError(SelectorError):
    """A rule refuses the request (test set already evaluated, budget spent)."""

    exit_code = 1


class LockboxError(RefusedError):
    """The held-out test set was already claimed for this study."""


class BudgetSpent(RefusedError):
    """The study's n_trials are all finished already. `selector run` and `worker` report that
    there is nothing to do and exit 0 (a script may run them again at will); `--strict` keeps
    the refusal, exit 1."""

    def __init__(self, study: str, finished: int, n_trials: int) -> None:
        super().__init__(
            f"study {study!r} already has {finished} of its n_trials = {n_trials} finished "
            "trials; raise n_trials in the study file to run more"
        )
        self.study = study
        self.finished = finished
        self.n_trials = n_trials

    @property
    def nothing_to_do(self) -> str:
        return f"study {self.study!r}: nothing to do, all {self.n_trials} trials finished"


class TrialDiverged(Exception):
    """The training loss became non-finite; the trial ends at once as FAIL (reason `diverged`)."""

    def __init__(self, epoch: int, fold: int) -> None:
        super().__init__(f"non-finite training loss in fold {fold} at epoch {epoch}")
        self.epoch = epoch
        self.fold = fold


class TrialOutOfMemory(Exception):
    """The trial cannot fit in the memory available to it: refused by the memory estimate before
    anything was allocated; it ends at once as FAIL (reason `oom`). The message names the knobs
    (width, depth, batch size) and the bytes needed and available."""

    def __init__(self, message: str, *, need: int, available: int) -> None:
        super().__init__(message)
        self.need = need
        self.available = available
