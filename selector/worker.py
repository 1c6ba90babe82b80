"""A worker: claims a trial from the study's budget, trains it under a heartbeat, tells the result.

Workers are stateless; the database is the only coordinator. The budget (`n_trials` finished
trials, complete or pruned) is exact across workers and restarts: a worker starts a trial only
after counting the trials that are finished, running or waiting, under a lock that spans the count
and Optuna's `ask` (an advisory lock on PostgreSQL, a file lock beside a SQLite file). Failed trials
free their place; a worker whose claim is refused waits while trials elsewhere may still fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy as sa
import torch
from optuna.trial import FrozenTrial, TrialState

from selector import interrupt, storage
from selector.engine import derive_seed, resolve_device
from selector.errors import SelectorError
from selector.objective import MEDIAN_WARMUP, Objective
from selector.spec import StudySpec
from selector.storage import Heartbeat

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A waiting trial (a stale trial's retry) is not counted: `ask` runs it instead of a new one.
ACTIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
POLL_S = 1.0

Progress = Callable[[optuna.Study, FrozenTrial], None]


class FailureStreakError(SelectorError):
    """Too many consecutive trials failed; the worker stops with the last error."""

    exit_code = 1


@dataclass
class RunSummary:
    study: str
    metric: str
    finished: int
    budget: int
    ran: int
    best_value: float | None
    best_trial: int | None
    n_trials: int | None = None  # the study's own budget (the file's n_trials)


def make_sampler(spec: StudySpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Each worker's sampler gets its own seed, derived from the study seed and its worker id."""
    seed = derive_seed(spec.seed, 1_000_003, worker)
    name = spec.search.sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.training.max_epochs)
    if spec.search.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=MEDIAN_WARMUP)


def value_of(trial: FrozenTrial) -> float:
    """A complete trial's value (−inf for a trial without one, so it sorts last)."""
    return float(trial.value) if trial.value is not None else float("-inf")


def count(study: optuna.Study, states: tuple[TrialState, ...] = FINISHED) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def failure_reason(trial: FrozenTrial) -> str:
    """Why a trial failed. A failed trial without a recorded reason was reaped by the heartbeat
    check: its worker died or went silent past the grace period."""
    return str(trial.user_attrs.get("fail_reason", "stale"))


def describe_failure(trial: FrozenTrial) -> str:
    error = str(trial.user_attrs.get("error", "")).strip().splitlines()
    return f"{failure_reason(trial)}: {error[-1] if error else 'no detail'}"


def summarize(study: optuna.Study, budget: int, *, ran: int = 0) -> RunSummary:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=value_of) if complete else None
    return RunSummary(
        study=study.study_name,
        metric=str(study.user_attrs.get("metric", "score")),
        finished=count(study),
        budget=budget,
        ran=ran,
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        n_trials=study.user_attrs.get("selector:n_trials"),
    )


# --- the budget lock -------------------------------------------------------------------------


@contextlib.contextmanager
def budget_lock(url: str, name: str) -> Iterator[None]:
    """Serialise budget claims of one study across processes and machines."""
    path = storage.sqlite_path(url)
    if path is not None:
        with open(f"{path}.{name}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif storage.is_postgres(url):
        key = zlib.crc32(f"selector:{name}".encode()) - 2**31
        with storage.engine(url).begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            yield
    else:  # gRPC proxy: no lock can span the count and the ask
        yield


def claim(study: optuna.Study, url: str, limit: int) -> optuna.Trial | None:
    """Start a trial if fewer than `limit` trials are finished or running."""
    with budget_lock(url, study.study_name):
        if count(study, ACTIVE) >= limit:
            return None
        with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for optimize()
            warnings.simplefilter("ignore", UserWarning)
            return study.ask()


# --- running one trial ----------------------------------------------------------------------


@contextlib.contextmanager
def beating(study: optuna.Study, trial: optuna.Trial, every: int) -> Iterator[None]:
    """Record the trial's heartbeat from a thread while it trains."""
    store: Any = study._storage  # Optuna wraps an RDBStorage in a cache that beats for it
    if getattr(store, "get_heartbeat_interval", lambda: None)() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; never kill the trial
                store.record_heartbeat(trial._trial_id)
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: Objective,
    heartbeat: Heartbeat,
    worker: int = 0,
) -> FrozenTrial:
    value: float | None = None
    state = TrialState.FAIL
    with beating(study, trial, heartbeat.interval):
        try:
            value, state = objective(trial, {"worker": worker}), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt:
            _tell(study, trial, None, TrialState.FAIL)
            raise
        except Exception:  # recorded by the objective with its reason; the study goes on
            state = TrialState.FAIL
    return storage.retrying(lambda: _tell(study, trial, value, state))


def _tell(
    study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState
) -> FrozenTrial:
    """Tell the result; one that arrives after its trial was reaped as stale is kept as a study
    attribute (`late_result:N`) instead of crashing the worker."""
    if state == TrialState.COMPLETE and (value is None or not math.isfinite(value)):
        state, value = TrialState.FAIL, None
    try:  # tell reads the trial back: its state is the one recorded, ours or the reaper's
        frozen = study.tell(
            trial,
            value if state == TrialState.COMPLETE else None,
            state=state,
            skip_if_finished=True,
        )
    except optuna.exceptions.UpdateFinishedTrialError:  # reaped meanwhile
        frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state != state:
        study.set_user_attr(
            f"late_result:{trial.number}",
            {
                "state": state.name,
                "value": value,
                "recorded_state": frozen.state.name,
                "time": time.time(),
            },
        )
    return frozen


# --- the loop --------------------------------------------------------------------------------


class _Streak:
    def __init__(self, limit: int) -> None:
        self.limit, self.n, self.last = limit, 0, ""

    def add(self, trial: FrozenTrial) -> bool:
        """Count a finished trial; True once `limit` trials in a row have failed."""
        if trial.state != TrialState.FAIL:
            self.n = 0
            return False
        self.n, self.last = self.n + 1, describe_failure(trial)
        return self.n >= self.limit


def work(
    spec: StudySpec,
    url: str,
    objective: Objective,
    *,
    worker: int,
    limit: int,
    timeout: float | None = None,
    heartbeat: Heartbeat = Heartbeat(),
    progress: Progress | None = None,
) -> RunSummary:
    """Run trials until the study holds `limit` finished trials or `timeout` seconds passed."""
    study = optuna.load_study(
        study_name=spec.name,
        storage=storage.open_storage(url, must_exist=True, heartbeat=heartbeat),
        sampler=make_sampler(spec, worker),
        pruner=make_pruner(spec),
    )
    deadline = time.monotonic() + timeout if timeout is not None else math.inf
    streak, ran = _Streak(spec.search.max_failures), 0
    while time.monotonic() < deadline:
        interrupt.check()
        storage.retrying(lambda: reap_stale(study))
        trial = storage.retrying(lambda: claim(study, url, limit))
        if trial is None:
            if storage.retrying(lambda: count(study)) >= limit:
                break
            time.sleep(POLL_S)  # trials elsewhere are running; one may fail and free a place
            continue
        frozen = run_trial(study, trial, objective, heartbeat, worker)
        ran += frozen.state in FINISHED
        if progress is not None:
            storage.retrying(functools.partial(progress, study, frozen))
        if streak.add(frozen):
            raise FailureStreakError(
                f"study {spec.name!r} stopped after {streak.n} consecutive failed trials; "
                f"last error: {streak.last}"
            )
    return storage.retrying(lambda: summarize(study, limit, ran=ran))


def reap_stale(study: optuna.Study) -> None:
    """Fail trials whose heartbeat stopped (their retry is queued by the storage's callback), and
    trials that never beat at all (`storage.orphaned_trial_ids`): they never trained, so they are
    failed without a retry. Both read as failure reason `stale`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for trial_id in storage.orphaned_trial_ids(study):
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


# Local workers sharing one GPU by default: trials this small are bound by the CPU side of kernel
# launches, so a few processes keep the GPU busier (H100, digits study, 20 trials: 1 worker 0.97
# trials/s, 4 workers 1.77, 8 workers 2.01).
GPU_WORKERS = 4


def default_workers(spec: StudySpec, n_trials: int | None = None) -> int:
    """Local workers for `selector run` without `--workers`, never more than the trials asked for:
    on the CPU one single-threaded worker per core (on 2 cores, 2 workers x 1 thread finished
    1.47x the trials of 1 worker x 2 threads: `python -m bench.workers`); on a GPU `GPU_WORKERS`."""
    cores = os.cpu_count() or 1
    on_gpu = resolve_device(spec.training.device).type != "cpu"
    wanted = min(GPU_WORKERS, cores) if on_gpu else cores
    return max(1, min(wanted, n_trials or spec.n_trials))


def torch_threads(workers: int) -> int:
    """Intra-op threads for each of `workers` local workers: the cores shared out evenly."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def use_threads(n: int) -> None:
    torch.set_num_threads(n)
