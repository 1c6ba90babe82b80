"""A worker: claims a trial from the study's budget, trains it under a heartbeat, tells the result.

Workers are stateless; the database is the only coordinator. The budget (`n_trials` finished
trials, complete or pruned) is exact across workers and restarts: a worker starts a trial only
after counting the trials that are finished, running or waiting, under a lock that spans the count
and Optuna's `ask` (an advisory lock on PostgreSQL, a file lock beside a SQLite file). Failed trials
free their place; a worker whose claim is refused waits while trials elsewhere may still fail.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import math
import os
import stat
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import sqlalchemy as sa
import torch
from optuna.trial import FrozenTrial, TrialState

from selector import interrupt, record, storage, tpe
from selector.engine import CVResult, derive_seed, resolve_device
from selector.errors import SelectorError, StorageError
from selector.objective import MEDIAN_WARMUP, Objective, Started
from selector.progress import Bar
from selector.record import (
    ACTIVE,
    FINISHED,
    HEARTBEAT_ATTR,
    RunSummary,
    count,
    describe_failure,
    summarize,
)
from selector.space import TrialConfig, sample_config
from selector.spec import StudySpec
from selector.storage import Heartbeat

POLL_S = 1.0

Progress = Callable[[optuna.Study, FrozenTrial], None]


class FailureStreakError(SelectorError):
    """Too many consecutive trials failed; the worker stops with the last error."""

    exit_code = 1


def make_sampler(
    spec: StudySpec, worker: int = 0, fusing: bool = False
) -> optuna.samplers.BaseSampler:
    """Each worker's sampler gets its own seed, derived from the study seed and its worker id.
    Where a worker trains groups of trials (`fusing`), TPE runs with its constant liar: the
    group's running members count as bad results while the next member is sampled, so the
    members of one group spread out instead of repeating each other."""
    seed = derive_seed(spec.seed, 1_000_003, worker)
    name = spec.search.sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    tpe.install()  # the same proposals, cheaper
    return optuna.samplers.TPESampler(seed=seed, constant_liar=fusing)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.training.max_epochs)
    if spec.search.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=MEDIAN_WARMUP)


# --- the budget lock -------------------------------------------------------------------------


@contextlib.contextmanager
def budget_lock(url: str, name: str) -> Iterator[None]:
    """Serialise budget claims of one study across processes and machines.

    Beside a SQLite file the lock is a file, opened without following a link planted at its
    path (O_NOFOLLOW) and only if it is a regular file (a FIFO would block the worker)."""
    path = storage.sqlite_path(url)
    if path is not None:
        lock = f"{path}.{name}.lock"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(lock, flags | os.O_CLOEXEC, 0o644)
        except OSError as e:
            why = (
                "is a symbolic link; remove it (selector creates it as a plain file)"
                if e.errno == errno.ELOOP
                else f"cannot be opened ({e.strerror}); free space or fix the permissions"
            )
            raise StorageError(
                f"{lock}: the study's budget lock file {why}, and run again"
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(
                    f"{lock}: the study's budget lock file is not a regular file; remove it "
                    "(selector creates it as a plain file) and run again"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
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


def claim_group(
    study: optuna.Study, url: str, limit: int, size: int, objective: Objective
) -> list[tuple[optuna.Trial, TrialConfig | None]]:
    """Start up to `size` trials to train as fused groups, if the budget allows.

    Every trial of the claim is the sampler's own choice of every parameter: the first (the
    leader) is the study's `ask`; under TPE each of the others is TPE's own proposal from one fit
    of its model for the whole claim (`follower_proposals`), with any other sampler its `ask`.
    The grouping comes after: the claim trains as one model for each depth and batch size,
    cut further by width (`fused.split_claim`). All are claimed under the budget lock, so
    `n_trials` stays exact; members are as many as fit in memory at the space's largest depth,
    width and batch size. Returns each trial with its config (None for a lone trial, sampled
    when it starts)."""
    with storage.created_trials(study) as made:
        try:
            with budget_lock(url, study.study_name), record.core_trial_reads(study):  # ask reads
                free = limit - count(study, ACTIVE)
                if free <= 0:
                    return []
                with warnings.catch_warnings():  # Optuna warns: heartbeats are for optimize()
                    warnings.simplefilter("ignore", UserWarning)
                    n = min(size, free)
                    return [(study.ask(), None)] if n <= 1 else _group(study, objective, n, made)
        except storage.TRANSIENT:
            # the claim is retried from the start. Where the lock's own connection was lost,
            # the lock went with it, and another worker may have claimed the same places: what
            # this one created must not run (nor stay running)
            _abandon(study, made)
            raise


def _group(
    study: optuna.Study, objective: Objective, n: int, made: list[int]
) -> list[tuple[optuna.Trial, TrialConfig | None]]:
    """`claim_group`'s claim of `n`, under its lock: the leader, then its followers (the ids of
    those created together appended to `made`).

    The followers once took the leader's depth and batch size, so that a claim was one model:
    then a key was drawn once a claim and observed by 32 trials, and TPE never left the first
    one (breast_cancer, seed 2: every claim of a 2-minute search at depth 2, 17 of 19 at batch
    size 64, where `--fuse 1` settled on depth 1 and batch size 16)."""
    from selector import fused

    space = objective.spec.space
    with record.one_read(study, running=False), storage.buffered_params(study):  # 1 read, 1 write
        leader = study.ask()
        config = sample_config(leader, space)
    n = fused.members_that_fit(
        fused.largest(config, space), objective.folds, objective.n_out, objective.device, n
    )
    own = study.sampler
    with record.one_read(study, running=False), storage.buffered_params(study):
        planned = follower_proposals(study, own, n - 1)  # one fit for all
        members: list[tuple[optuna.Trial, TrialConfig | None]] = [(leader, config)]
        ids = storage.new_trials(study, n - 1)  # one transaction for all
        made.extend(ids or [])
        try:
            for j in range(n - 1):
                if planned:
                    with warnings.catch_warnings():  # experimental since Optuna 2.4
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        study.sampler = optuna.samplers.PartialFixedSampler(planned[j], own)
                trial = study.ask() if ids is None else optuna.Trial(study, ids[j])
                members.append((trial, sample_config(trial, space)))
        finally:
            study.sampler = own
            storage.forget_fresh(study)
    return members


def _abandon(study: optuna.Study, trial_ids: list[int]) -> None:
    """Fail the trials of a claim that a lost connection cut short, before it is retried: they
    never trained, and would otherwise stay running, without a heartbeat, until a reaper saw
    them (`storage.orphaned_trial_ids`; none does once the budget is spent), or would be places
    of the budget claimed twice. Failed as the reaper fails them: no retry, failure reason
    `stale`. One try each (the pool hands out a fresh connection); where the database is still
    out of reach, the reaper is the fallback."""
    for trial_id in trial_ids:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, *storage.TRANSIENT):
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


def follower_proposals(
    study: optuna.Study, sampler: optuna.samplers.BaseSampler, n: int
) -> list[dict[str, Any]] | None:
    """The params of `n` followers of a claim, as TPE proposes them, from one fit of its two
    Parzen estimators for the whole claim; None where the sampler does not propose this way (not
    a multivariate TPE, or still in its random start-up trials), and followers are then asked
    one by one.

    TPE's proposal for one trial: split the finished trials (and, with its constant liar, the
    running ones, as bad) into good and bad, fit a Parzen estimator l to the good and g to the
    bad, draw `n_ei_candidates` from l and keep the one with the largest l/g. Each follower here
    is exactly that, with its own candidates drawn from the same l and g: the draws TPE makes
    for trials asked side by side, as when workers ask at once. What it leaves out is the liar
    inside the claim (a follower does not see the followers before it among the bad; the leader
    and every other running trial it does see). Fitting once instead of once a follower cuts a
    claim's sampling about M-fold: 11 of a fused penguins trial's 40 ms went to TPE's fit at 900
    trials."""
    if not isinstance(sampler, optuna.samplers.TPESampler) or n <= 0:
        return None
    try:
        if sampler._group:  # TPE's grouped search spaces: asked one by one
            return None
        from optuna.samplers._tpe.sampler import _split_trials, default_gamma

        finished = study._get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=True
        )
        if len(finished) < sampler._n_startup_trials:
            return None
        space = sampler.infer_relative_search_space(study, finished[-1])
        if not space:
            return None
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        trials = study._get_trials(deepcopy=False, states=states, use_cache=False)
        if not sampler._constant_liar:
            trials = [t for t in trials if t.state != TrialState.RUNNING]
        gamma = sampler._gamma or default_gamma
        n_finished = sum(t.state != TrialState.RUNNING for t in trials)
        below, above = _split_trials(study, trials, gamma(n_finished))
        good = sampler._build_parzen_estimator(study, space, below, handle_below=True)
        bad = sampler._build_parzen_estimator(study, space, above, handle_below=False)
        k = sampler._n_ei_candidates
        candidates = good.sample(sampler._rng.rng, k * n)
        acquisition = sampler._compute_acquisition_func(candidates, good, bad)
    except (ImportError, AttributeError):  # Optuna's internals moved: ask one by one
        return None
    proposals = []
    for j in range(n):
        own = {name: v[j * k : (j + 1) * k] for name, v in candidates.items()}
        best = sampler._compare(own, acquisition[j * k : (j + 1) * k])
        proposals.append({name: space[name].to_external_repr(best[name]) for name in space})
    return proposals


# --- running one trial ----------------------------------------------------------------------


def beats(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (set up with an interval)."""
    store: Any = study._storage
    return getattr(store, "get_heartbeat_interval", lambda: None)() is not None


@contextlib.contextmanager
def beating(
    study: optuna.Study,
    trial: optuna.Trial | list[optuna.Trial],
    every: int,
    *,
    first_recorded: bool = False,
) -> Iterator[set[int]]:
    """Record the heartbeats of `trial` (or of each trial in a list) from a thread while they
    train; yields the set of trial ids still beating (remove one as it is told). With
    `first_recorded` the caller records their first heartbeats (with their start, in one
    transaction: `TrialWrite.heartbeat`), and the thread's first beat is `every` seconds on."""
    trials = trial if isinstance(trial, list) else [trial]
    live = {t._trial_id for t in trials}
    store: Any = study._storage  # Optuna wraps an RDBStorage in a cache that beats for it
    if not beats(study):
        yield live
        return
    stop = threading.Event()

    def beat() -> None:
        if first_recorded and stop.wait(every):
            return
        while True:
            for trial_id in list(live):
                with contextlib.suppress(Exception):  # a missed beat is retried; never kill it
                    store.record_heartbeat(trial_id)
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trials[0].number}", daemon=True)
    thread.start()
    try:
        yield live
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
            beat = {"interval": heartbeat.interval, "grace": heartbeat.grace}
            value = objective(trial, {"worker": worker}, {HEARTBEAT_ATTR: beat})
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is FAIL, nothing left RUNNING
            storage.retrying(lambda: _tell(study, trial, None, TrialState.FAIL))
            raise
        except SelectorError:  # the storage itself failed (a full disk): stop, nothing RUNNING
            with contextlib.suppress(Exception):
                _tell(study, trial, None, TrialState.FAIL)
            raise
        except Exception:  # recorded by the objective with its reason; the study goes on
            state = TrialState.FAIL
    return storage.retrying(lambda: _tell(study, trial, value, state))


def run_group(
    study: optuna.Study,
    claimed: list[tuple[optuna.Trial, TrialConfig | None]],
    objective: Objective,
    heartbeat: Heartbeat,
    worker: int = 0,
    on_told: Callable[[list[FrozenTrial]], None] | None = None,
) -> list[FrozenTrial]:
    """Train `trials` as one fused group (`Objective.group`). Each member is told as it leaves
    the group: complete, pruned or failed with its own reason, those that leave at one epoch
    together; `on_told(frozen trials)` then. A
    Ctrl-C or SIGTERM fails every member still training and is raised; an error of the group
    itself (out of memory) fails those members with its reason and the study goes on."""
    beat = {"interval": heartbeat.interval, "grace": heartbeat.grace}
    told: dict[int, FrozenTrial] = {}
    trials = [t for t, _ in claimed]
    in_one = beats(study) and storage.writes_in_one(study)  # first beats with the start
    with beating(study, trials, heartbeat.interval, first_recorded=in_one) as live:
        attrs = {"worker": worker, "group": trials[0].number, "group_size": len(trials)}
        members = [objective.start(t, attrs, config=c, write=False) for t, c in claimed]
        parts = objective.parts([m.config for m in members])
        for part in parts:  # which model each trained in, for `selector replay`
            for i in part:
                members[i].out.attrs["fused_model"] = members[part[0]].trial.number
        storage.retrying(  # every member's start (and first heartbeat) in one transaction
            lambda: storage.write_trials(
                [
                    storage.TrialWrite(
                        m.trial, m.out.attrs, {HEARTBEAT_ATTR: beat}, heartbeat=in_one
                    )
                    for m in members
                ]
            )
        )
        for m in members:
            m.out.attrs = {}

        def tell_one(m: Started, outcome: CVResult | BaseException) -> FrozenTrial:
            """A member's result written and told as a lone trial's (`_tell`); one reaped
            meanwhile keeps its result as a late result."""
            value: float | None = None
            pruned = isinstance(outcome, optuna.TrialPruned)
            state = TrialState.PRUNED if pruned else TrialState.FAIL
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if isinstance(outcome, CVResult):
                    value, state = outcome.value, TrialState.COMPLETE
                    objective.finish(m, outcome)
                else:
                    objective.record_failure(m, outcome)
            return storage.retrying(lambda: _tell(study, m.trial, value, state))

        def tell(left: list[tuple[Started, CVResult | BaseException]]) -> None:
            """Members that left together (at one epoch): each one's last write and its end in
            one transaction (`end_trials`), their out-of-fold predictions in another. Through a
            gRPC proxy, or where one of them was reaped meanwhile, each as a lone trial's."""
            frozen = None
            if storage.writes_in_one(study):
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    frozen = end_trials(study, objective.endings(left))
            if frozen is None:
                frozen = [tell_one(m, outcome) for m, outcome in left]
            else:
                objective.write_oof([(m.trial, o) for m, o in left if isinstance(o, CVResult)])
            for (m, _), f in zip(left, frozen, strict=True):
                told[m.trial.number] = f
                live.discard(m.trial._trial_id)
            if on_told is not None:
                on_told(frozen)

        def fail_rest(e: BaseException) -> None:
            rest = [m for m in members if m.trial.number not in told]
            if rest:
                with contextlib.suppress(Exception):
                    tell([(m, e) for m in rest])

        try:
            objective.group(members, parts, tell)
        except (KeyboardInterrupt, SelectorError) as e:  # a stop, or the storage failed
            fail_rest(e)
            raise
        except Exception as e:  # the group could not train (out of memory): its members fail
            fail_rest(e)
    return [told[t.number] for t in trials if t.number in told]


def end_trials(study: optuna.Study, writes: list[storage.TrialWrite]) -> list[FrozenTrial]:
    """End running trials as `Study.tell` would, all in one transaction with their last writes
    (`storage.write_trials`): the sampler's `after_trial` for each, then state, completion time
    and value. `tell` costs each trial a transaction and two read-backs (about 6 ms); a fused
    group's members that leave at one epoch end together. Raises `UpdateFinishedTrialError`,
    writing nothing, if one of them was reaped meanwhile."""
    from optuna.pruners import _filter_study

    ends = []
    for w in writes:
        assert w.state is not None
        state, value = _recorded(w.state, w.value)
        ends.append(dataclasses.replace(w, state=state, value=value))
        frozen = w.trial._cached_frozen_trial
        values = None if value is None else [value]
        study.sampler.after_trial(_filter_study(study, frozen), frozen, state, values)
    storage.retrying(lambda: storage.write_trials(ends))
    ended = [copy.deepcopy(w.trial._cached_frozen_trial) for w in writes]
    record.cache_finished(study, ended)  # the next reads of the study need not read them
    return ended  # as cached: read-only


def _recorded(state: TrialState, value: float | None) -> tuple[TrialState, float | None]:
    """The state and value a trial ends with: a complete one without a finite value fails."""
    if state == TrialState.COMPLETE and (value is None or not math.isfinite(value)):
        return TrialState.FAIL, None
    return state, value


def _tell(
    study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState
) -> FrozenTrial:
    """Tell the result; one that arrives after its trial was reaped as stale is kept as a study
    attribute (`late_result:N`) instead of crashing the worker."""
    state, value = _recorded(state, value)
    try:  # tell reads the trial back: its state is the one recorded, ours or the reaper's
        with record.core_trial_reads(study):
            frozen = study.tell(
                trial,
                value if state == TrialState.COMPLETE else None,
                state=state,
                skip_if_finished=True,
            )
    except optuna.exceptions.UpdateFinishedTrialError:  # reaped meanwhile
        frozen = study._storage.get_trial(trial._trial_id)
    record.cache_finished(study, [copy.deepcopy(frozen)])  # as `end_trials` ends: seen at once
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
    fuse: int | str | None = None,
) -> RunSummary:
    """Run trials until the study holds `limit` finished trials or `timeout` seconds passed;
    in fused groups of up to `fuse` trials (default: the study's `[search] fuse`)."""
    size = group_size(spec, objective, spec.search.fuse if fuse is None else fuse)
    study = storage.retrying(
        lambda: optuna.load_study(
            study_name=spec.name,
            storage=storage.open_storage(url, must_exist=True, heartbeat=heartbeat),
            sampler=make_sampler(spec, worker, fusing=size > 1),
            pruner=make_pruner(spec),
        )
    )
    storage.retrying(lambda: record.refresh(study))  # the first read: selector's reader
    deadline = time.monotonic() + timeout if timeout is not None else math.inf
    streak, ran = _Streak(spec.search.max_failures), 0
    while time.monotonic() < deadline:
        interrupt.check()
        storage.retrying(lambda: reap_stale(study))
        claimed = storage.retrying(lambda: claim_group(study, url, limit, size, objective))
        if not claimed:
            if storage.retrying(lambda: count(study)) >= limit:
                break
            time.sleep(POLL_S)  # trials elsewhere are running; one may fail and free a place
            continue
        if len(claimed) == 1:
            done = [run_trial(study, claimed[0][0], objective, heartbeat, worker)]
            if progress is not None:
                storage.retrying(functools.partial(progress, study, done[0]))
        else:

            def told(frozen: list[FrozenTrial]) -> None:
                if progress is not None:
                    storage.retrying(functools.partial(_progress, progress, study, frozen))

            done = run_group(study, claimed, objective, heartbeat, worker, on_told=told)
        for frozen in done:
            ran += frozen.state in FINISHED
            if streak.add(frozen):
                raise FailureStreakError(
                    f"study {spec.name!r} stopped after {streak.n} consecutive failed trials; "
                    f"last error: {streak.last}"
                )
    return storage.retrying(lambda: summarize(study, limit, ran=ran))


def _progress(progress: Progress, study: optuna.Study, frozen: list[FrozenTrial]) -> None:
    """Tell `progress` of members that finished together, in the order of their numbers, from
    one read of the study's trials (running trials as cached: progress reads the finished
    ones, at most `record.FINISHED_READ_S` ago). A `progress.Bar` is told of them at once
    (`Bar.update_all`: one count for all)."""
    with record.one_read(study, running=False, within=record.FINISHED_READ_S):
        if isinstance(progress, Bar):
            progress.update_all(study, frozen)
            return
        for f in sorted(frozen, key=lambda t: t.number):
            progress(study, f)


def group_size(spec: StudySpec, objective: Objective, fuse: int | str) -> int:
    """The most trials this worker trains as one group: `fuse`, or for "auto" the size the
    fused engine's cost model gives (`fused.choose_size`), at most a quarter of the study's
    trials (so the sampler learns from several rounds)."""
    if fuse != "auto":
        return int(fuse)
    from selector import fused

    cap = max(1, spec.n_trials // AUTO_ROUNDS)
    if cap == 1:
        return 1
    sizing = fused.choose_size(
        spec.space, objective.folds, n_out=objective.n_out, device=objective.device, cap=cap
    )
    return sizing.size


# A study fused with "auto" runs in at least this many rounds of groups.
AUTO_ROUNDS = 4


def reap_stale(study: optuna.Study) -> None:
    """Fail trials whose heartbeat stopped for longer than the grace their own worker runs with
    (recorded with each trial, `storage.stale_trial_ids`; their retry is queued by the storage's
    callback), and trials that never beat at all (`storage.orphaned_trial_ids`): they never
    trained, so they are failed without a retry. Both read as failure reason `stale`."""
    store: Any = study._storage
    if not beats(study):
        return
    failed = []
    for trial_id in storage.stale_trial_ids(study):
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if store.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
    callback = store.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        if callback is not None:
            callback(study, copy.deepcopy(store.get_trial(trial_id)))
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
