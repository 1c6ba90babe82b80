"""One trial: config → K-fold training → per-epoch reports and pruning → user attrs."""

from __future__ import annotations

import contextlib
import copy
import math
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import sqlalchemy as sa
from optuna.trial import TrialState

from selector import db, diagnose, engine, interrupt, metrics, notes, record, stacked, storage
from selector.data import DevSet, FoldData, iter_folds
from selector.errors import FailReason, TrialDiverged
from selector.model import count_params
from selector.record import Curves, TrialRecord
from selector.space import TrialConfig, sample_config
from selector.spec import StudySpec

MAX_TRACEBACK_CHARS = 4000


# Without a pruner the per-epoch scores are written in batches, at most this often (and at the end).
FLUSH_SECONDS = 5.0


# The median pruner's warm-up: it never prunes before this epoch (`worker.make_pruner`).
MEDIAN_WARMUP = 3


def first_prunable_epoch(pruner: str) -> int | None:
    """The first epoch at which the study's pruner can prune a trial; None for no pruner."""
    return {"none": None, "median": MEDIAN_WARMUP}.get(pruner, 1)


class _Writer:
    """What a running trial writes: its per-epoch mean CV scores (Optuna intermediate values) and
    its user attrs, gathered into few transactions.

    Scores wait until `FLUSH_SECONDS` have passed or the trial ends, and go out in the same
    transaction as the attrs written then: the dashboard's curves lag by at most that much. No
    pruner reads another trial's scores before it is complete (the median pruner reads complete
    trials; successive halving, the rungs each trial records), so from the first epoch its
    pruner can act (`prune_from`) the pruner is asked with the trial's scores so far, written or
    pending (`prune_decisions`)."""

    def __init__(self, trial: optuna.Trial, prune_from: int | None) -> None:
        self.trial = trial
        self.prune_from = prune_from
        self.scores: list[tuple[int, float]] = []
        self.attrs: dict[str, Any] = {}
        self.flushed = time.monotonic()

    def epoch(self, epoch: int, value: float) -> None:
        self.scores.append((epoch, value))
        interrupt.check()  # Ctrl-C: between epochs, the trial recorded as interrupted
        if time.monotonic() - self.flushed >= FLUSH_SECONDS:
            self.flush()
        prunes = self.prune_from is not None and epoch >= self.prune_from
        if prunes and storage.retrying(lambda: prune_decisions(self.trial.study, [self])[0]):
            raise self.pruned(epoch, value)

    def pruned(self, epoch: int, value: float) -> optuna.TrialPruned:
        """The trial stops here: the epoch is recorded with it, and the exception that says so."""
        self.attrs["pruned_at_epoch"] = epoch
        return optuna.TrialPruned(f"pruned at epoch {epoch} (mean CV score {value:.4f})")

    def flush(
        self,
        attrs: dict[str, Any] | None = None,
        system: dict[str, Any] | None = None,
        study_system: dict[str, Any] | None = None,
    ) -> None:
        """Write what is pending, `attrs` and `system` attrs (and the study's `study_system`
        attrs: the trial's dashboard note), in one transaction (retried if transient)."""
        self.attrs.update(attrs or {})
        scores, pending = self.scores, self.attrs
        if scores or pending or system or study_system:
            storage.retrying(
                lambda: storage.write_trial(
                    self.trial,
                    user_attrs=pending,
                    system_attrs=system,
                    intermediate=scores,
                    study_system_attrs=study_system,
                )
            )
        self.scores, self.attrs, self.flushed = [], {}, time.monotonic()


@dataclass
class Started:
    """A trial that has started: its config and seed, its record so far, its writer, when."""

    trial: optuna.Trial
    config: TrialConfig
    seed: int
    record: TrialRecord
    out: _Writer
    began: float


class Objective:
    """Callable for `study.optimize`. The K folds are preprocessed once per worker: each fold's
    statistics come from its own training rows, so every trial sees identical folds."""

    def __init__(self, spec: StudySpec, dev: DevSet) -> None:
        self.spec = spec
        self.dev = dev
        self.metric = metrics.get(spec.metric)
        self.folds: list[FoldData] = list(iter_folds(dev))
        self.n_out = dev.n_classes if dev.task == "classification" else 1
        self._baseline: tuple[float | None] | None = None  # read once: recorded at create

    @property
    def device(self) -> Any:
        """The torch device trials train on."""
        return engine.resolve_device(self.spec.training.device)

    def start(
        self,
        trial: optuna.Trial,
        attrs: dict[str, Any] | None = None,
        system_attrs: dict[str, Any] | None = None,
        config: TrialConfig | None = None,
        write: bool = True,
    ) -> Started:
        """Sample the trial's config (unless `config`, sampled already, is given) and record its
        start: its first user attrs with `attrs` (the worker's id, its group), and
        `system_attrs` (the heartbeat it runs under); with `write=False` the user attrs are left
        pending in its writer, for the caller to write with others'."""
        if config is None:
            config = sample_config(trial, self.spec.space)
        seed = engine.derive_seed(self.spec.seed, trial.number)
        n_in = self.folds[0].X_train.shape[1]
        n_out = self.dev.n_classes if self.dev.task == "classification" else 1
        out = _Writer(trial, first_prunable_epoch(self.spec.search.pruner))
        started = TrialRecord(
            number=trial.number,
            state=TrialState.RUNNING,
            value=None,
            seed=seed,
            n_params=count_params(config, n_in, n_out),
        )
        if write:
            out.flush({**started.to_user_attrs(), **(attrs or {})}, system_attrs)
        else:
            out.attrs.update({**started.to_user_attrs(), **(attrs or {})})
        return Started(trial, config, seed, started, out, time.perf_counter())

    def __call__(
        self,
        trial: optuna.Trial,
        attrs: dict[str, Any] | None = None,
        system_attrs: dict[str, Any] | None = None,
    ) -> float:
        """Train and score one trial; `attrs` and `system_attrs` are recorded with its first
        user attrs (the worker's id, the heartbeat it runs under)."""
        s = self.start(trial, attrs, system_attrs)
        try:
            result = train(self.spec, self.dev, self.folds, s.config, s.seed, on_epoch=s.out.epoch)
        except BaseException as e:
            self.record_failure(s, e)
            raise
        return self.finish(s, result)

    def record_failure(self, s: Started, e: BaseException) -> None:
        """Record why a trial stopped without a result: pruned (its time), diverged, terminated,
        interrupted, out of memory, or an exception (its traceback)."""
        s.out.flush(failure_attrs(s, e))

    def finish(self, s: Started, result: engine.CVResult) -> float:
        """Record a trial's result: its record, out-of-fold predictions and dashboard note."""
        done, note = self._result(
            s, result, storage.retrying(lambda: record.study_best(s.trial.study))
        )
        system = {**done.to_system_attrs(), **note.trial}
        s.out.flush(done.to_user_attrs(), system, note.study)  # one transaction
        self.write_oof([(s.trial, result)])
        return result.value

    def _result(
        self, s: Started, result: engine.CVResult, best: tuple[float, float]
    ) -> tuple[TrialRecord, notes.NoteAttrs]:
        """A complete trial's record, and its dashboard note (with its figure) diagnosed
        against `best`, the study's best scores so far (`record.study_best`)."""
        done = finished_record(s.record, result, time.perf_counter() - s.began)
        return done, notes.trial_note_attrs(s.trial, done, self._diagnosis(s.trial, done, best))

    def endings(
        self, left: list[tuple[Started, engine.CVResult | BaseException]]
    ) -> list[storage.TrialWrite]:
        """The last writes of trials that ended together (a fused group's members leaving at
        one epoch), for `storage.write_trials` as one transaction: each one's pending scores,
        its record and note where complete or its failure reason, the state it ends in and its
        value (Optuna's: a pruned trial's last score; `worker.end_trials` fails a complete one
        whose value is not finite, as `tell` does). The study's best scores are read once."""
        best = (-math.inf, -math.inf)
        if any(isinstance(o, engine.CVResult) for _, o in left):
            best = storage.retrying(lambda: record.study_best(left[0][0].trial.study))
        writes = []
        for s, outcome in left:
            system: dict[str, Any] = {}
            note = notes.NoteAttrs()
            value: float | None = None
            if isinstance(outcome, engine.CVResult):
                done, note = self._result(s, outcome, best)
                attrs, system = done.to_user_attrs(), {**done.to_system_attrs(), **note.trial}
                state, value = TrialState.COMPLETE, outcome.value
            else:
                attrs = failure_attrs(s, outcome)
                pruned = isinstance(outcome, optuna.TrialPruned)
                state = TrialState.PRUNED if pruned else TrialState.FAIL
                if pruned:
                    steps = {
                        **s.trial._cached_frozen_trial.intermediate_values,
                        **dict(s.out.scores),
                    }
                    last = steps[max(steps)] if steps else None
                    value = last if last is not None and math.isfinite(last) else None
            writes.append(
                storage.TrialWrite(
                    s.trial,
                    {**s.out.attrs, **attrs},
                    system,
                    s.out.scores,
                    note.study,
                    state,
                    value,
                )
            )
        return writes

    def parts(self, configs: list[TrialConfig]) -> list[list[int]]:
        """A claim's trials cut into the models they train in (`fused.split_claim`)."""
        from selector import fused

        return fused.split_claim(
            configs,
            folds=len(self.folds),
            n_in=self.folds[0].X_train.shape[1],
            n_out=self.n_out,
            device=self.device.type,
        )

    def group(
        self,
        members: list[Started],
        parts: list[list[int]],
        on_done: Callable[[list[tuple[Started, engine.CVResult | BaseException]]], None],
    ) -> None:
        """Train the `members` (a claim) as fused models, one for each of its `parts`
        (`Objective.parts`: one for each depth and batch size, cut further by width where
        padding would cost more than a group's step); a part of one trains with the stacked
        engine, as a trial alone. Each member's epochs, pruning and result go to its own trial;
        `on_done([(member, outcome)])` with the members that leave their group at one epoch
        (`selector.fused.drive_group`)."""
        from selector import fused

        prune_from = first_prunable_epoch(self.spec.search.pruner)
        flushed = time.monotonic()

        def stopped(
            members: list[Started], epoch: int, values: dict[int, float]
        ) -> dict[int, Exception]:
            nonlocal flushed
            interrupt.check()  # Ctrl-C: between epochs, every member recorded as interrupted
            for i, value in values.items():
                members[i].out.scores.append((epoch, value))
            prunes = prune_from is not None and epoch >= prune_from
            if time.monotonic() - flushed >= FLUSH_SECONDS:
                flush_all([members[i].out for i in values])
                flushed = time.monotonic()
            if not prunes:
                return {}
            return storage.retrying(lambda: prune_members(members, values, epoch))

        for part in parts:
            group = [members[i] for i in part]
            if len(group) == 1:  # a part of one: the stacked engine, as for a trial alone
                self._alone(group[0], on_done)
                continue

            def on_epoch(
                epoch: int, values: dict[int, float], group: list[Started] = group
            ) -> dict[int, Exception]:
                return stopped(group, epoch, values)

            fused.cross_validate_group(
                [m.config for m in group],
                self.folds,
                task=self.dev.task,
                n_classes=self.dev.n_classes,
                metric=self.metric,
                training=self.spec.training,
                seeds=[m.seed for m in group],
                on_epoch=on_epoch,
                on_done=lambda left, group=group: on_done([(group[i], o) for i, o in left]),  # type: ignore[misc]
            )

    def _alone(
        self,
        m: Started,
        on_done: Callable[[list[tuple[Started, engine.CVResult | BaseException]]], None],
    ) -> None:
        """One member trained by itself, its outcome to `on_done` as a group's would be."""
        try:
            result = train(self.spec, self.dev, self.folds, m.config, m.seed, on_epoch=m.out.epoch)
        except Exception as e:  # pruned, diverged, out of memory: this member's outcome
            on_done([(m, e)])
            return
        on_done([(m, result)])

    def write_oof(self, results: list[tuple[optuna.Trial, engine.CVResult]]) -> None:
        """Trials' out-of-fold predictions, for the bias-corrected estimate, in one transaction
        (SQL storages; through a gRPC proxy no worker reaches selector's tables)."""
        results = [(t, r) for t, r in results if r.oof]
        url = notes.storage_url(results[0][0].storage) if results else None
        if url is None:
            return
        rows = []
        for trial, result in results:
            kind, pred = oof_predictions(self.dev, self.metric, result.oof, self.spec.cv.folds)
            rows.append(
                {
                    "study_name": self.spec.name,
                    "trial_number": trial.number,
                    "kind": kind,
                    "data": record.pack_oof(pred, kind),
                }
            )
        numbers = [r["trial_number"] for r in rows]

        def write() -> None:
            with db.transaction(url) as conn:
                conn.execute(
                    sa.delete(db.oof).where(
                        db.oof.c.study_name == self.spec.name, db.oof.c.trial_number.in_(numbers)
                    )
                )
                conn.execute(db.oof.insert(), rows)

        storage.retrying(write)

    def _baseline_of(self, study: optuna.Study) -> float | None:
        """The trivial predictor's score, recorded when the study was created."""
        if self._baseline is None:
            self._baseline = (study.user_attrs.get(record.ATTR_BASELINE),)
        return self._baseline[0]

    def _diagnosis(
        self, trial: optuna.Trial, done: TrialRecord, best: tuple[float, float]
    ) -> diagnose.Diagnosis:
        """The new trial's diagnosis against the study's best scores now, `best` (the dashboard
        refreshes its note when later trials change it)."""
        ctx = diagnose.context(
            [done],
            metric=self.spec.metric,
            baseline=self._baseline_of(trial.study),
            max_epochs=self.spec.training.max_epochs,
            best=best,
        )
        return diagnose.diagnose(done, ctx)


def failure_attrs(s: Started, e: BaseException) -> dict[str, Any]:
    """What a trial that stopped without a result records: a pruned one its time; a failed
    one its reason (diverged, terminated, interrupted, out of memory, exception) and error."""
    if isinstance(e, optuna.TrialPruned):
        return {"seconds": round(time.perf_counter() - s.began, 3)}
    if isinstance(e, TrialDiverged):
        reason: FailReason = "diverged"
        error = str(e)
    elif isinstance(e, interrupt.Terminated):
        reason, error = "terminated", "terminated by a signal (SIGTERM): the process was stopped"
    elif isinstance(e, KeyboardInterrupt):
        reason, error = "interrupted", "interrupted by the user (Ctrl-C)"
    elif engine.is_out_of_memory(e):  # estimated before allocating, or a failed allocation
        reason, error = "oom", str(e).strip() or type(e).__name__
    else:
        reason, error = "exception", "".join(traceback.format_exception(e))
    return {"fail_reason": reason, "error": error[-MAX_TRACEBACK_CHARS:]}


def flush_all(writers: list[_Writer]) -> None:
    """What each writer has pending, all in one transaction (retried if transient)."""
    writes = [storage.TrialWrite(w.trial, w.attrs, {}, w.scores) for w in writers]
    storage.retrying(lambda: storage.write_trials(writes))
    now = time.monotonic()
    for w in writers:
        w.scores, w.attrs, w.flushed = [], {}, now


def prune_members(
    members: list[Started], values: dict[int, float], epoch: int
) -> dict[int, Exception]:
    """The study pruner's decision for each member scored this epoch (`prune_decisions`): the
    members that stop, as `TrialPruned`."""
    if not values:
        return {}
    study = members[next(iter(values))].trial.study
    scored = list(values)
    pruned: dict[int, Exception] = {}
    decisions = prune_decisions(study, [members[i].out for i in scored])
    for i, prune in zip(scored, decisions, strict=True):
        if prune:
            pruned[i] = members[i].out.pruned(epoch, values[i])
    return pruned


def prune_decisions(study: optuna.Study, writers: list[_Writer]) -> list[bool]:
    """The study pruner's decision for each writer's trial, given its scores so far (written or
    pending), from one read of the study's trials (`record.one_read`; running trials as cached
    where the pruner reads finished ones only, and then at most every `record.FINISHED_READ_S`).
    `Trial.should_prune` reads the trial back, and the study's running trials through Optuna's
    ORM: about 5 ms an epoch, against 1."""
    finished_only = isinstance(
        study.pruner, optuna.pruners.PercentilePruner | optuna.pruners.NopPruner
    )
    decisions = []
    with (
        record.one_read(
            study,
            running=not finished_only,
            within=record.FINISHED_READ_S if finished_only else 0.0,
        ),
        record.core_trial_reads(study),
        _shared_percentiles(study) as view,
    ):
        for w in writers:
            # Successive halving reads the rungs it recorded on the trial: read it back.
            now = copy.copy(
                w.trial._cached_frozen_trial
                if finished_only
                else study._storage.get_trial(w.trial._trial_id)
            )
            now.intermediate_values = {**now.intermediate_values, **dict(w.scores)}
            decisions.append(bool(study.pruner.prune(view, now)))
    return decisions


class _ReadOnce:
    """A study whose trial lists are read once (`get_trials` without deep copies, by states),
    for one round of pruning decisions; its complete trials from `record.finished_trials`
    where Optuna's cache holds them; everything else is the study's own."""

    def __init__(self, study: optuna.Study, finished: record.Finished | None) -> None:
        self._study = study
        self._finished = finished
        self._lists: dict[Any, list[optuna.trial.FrozenTrial]] = {}

    def get_trials(
        self, deepcopy: bool = True, states: Any = None
    ) -> list[optuna.trial.FrozenTrial]:
        if deepcopy:
            return self._study.get_trials(deepcopy=True, states=states)
        key = None if states is None else tuple(states)
        if key == (TrialState.COMPLETE,) and self._finished is not None:
            return self._finished.complete
        if key not in self._lists:
            self._lists[key] = self._study.get_trials(deepcopy=False, states=states)
        return self._lists[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


@contextlib.contextmanager
def _shared_percentiles(study: optuna.Study) -> Iterator[Any]:
    """Within the block, the study as a percentile (median) pruner reads it for the members of
    a group deciding at one epoch: the complete trials listed once, and each step's percentile
    over them (Optuna's `_get_percentile_intermediate_result_over_trials`, the same value for
    every member at that step) computed once, instead of once a member, each O(trials). Where
    Optuna's cache holds the study, the complete trials are `record.finished_trials`' and the
    percentile is computed once per count of complete trials, across epochs and groups.
    Other pruners get the study itself."""
    if not isinstance(study.pruner, optuna.pruners.PercentilePruner):
        yield study
        return
    from optuna.pruners import _percentile

    own = _percentile._get_percentile_intermediate_result_over_trials
    finished = record.finished_trials(study)
    memo: dict[tuple[Any, ...], float] = {}

    def percentile(trials: list[Any], direction: Any, step: int, q: float, n_min: int) -> float:
        if finished is not None and trials is finished.complete:
            return finished.percentile(direction, step, q, n_min)
        key = (id(trials), direction, step, q, n_min)
        if key not in memo:
            memo[key] = own(trials, direction, step, q, n_min)
        return memo[key]

    _percentile._get_percentile_intermediate_result_over_trials = percentile  # type: ignore[assignment]
    try:
        yield _ReadOnce(study, finished)
    finally:
        _percentile._get_percentile_intermediate_result_over_trials = own


def finished_record(started: TrialRecord, r: engine.CVResult, seconds: float) -> TrialRecord:
    """A complete trial's record, from its start and its cross-validation result."""
    return TrialRecord(
        number=started.number,
        state=TrialState.COMPLETE,
        value=r.value,
        seed=started.seed,
        n_params=started.n_params,
        fold_seeds=tuple(r.seeds),
        fold_scores=tuple(r.fold_scores),
        train_fold_scores=tuple(r.train_scores),
        best_epoch=r.best_epoch,
        epochs_run=r.epochs_run,
        seconds=seconds,
        curves=Curves(
            folds=np.asarray(r.fold_curves, dtype=float).reshape(len(r.fold_scores), -1),
            loss=np.asarray(r.train_loss_curve, dtype=float),
            grads=np.asarray(r.grad_norms, dtype=float).reshape(len(r.grad_norms), -1),
        ),
    )


def oof_predictions(
    dev: DevSet, metric: metrics.Metric, per_fold: list[np.ndarray], k: int
) -> tuple[str, np.ndarray]:
    """Each dev row's prediction by the fold model that did not train on it (first repeat),
    in dev-row order: labels where the metric scores labels, else probabilities or values."""
    first = per_fold[:k]
    rows = np.concatenate([val for _, val in dev.folds[:k]])
    stacked_pred = np.concatenate(first, axis=0)
    pred = np.empty_like(stacked_pred)
    pred[rows] = stacked_pred
    if dev.task == "regression":
        return "values", pred
    if metric.needs == "labels":
        return "labels", pred.argmax(axis=1)
    return "proba", pred


def train(
    spec: StudySpec,
    dev: DevSet,
    folds: list[FoldData],
    config: TrialConfig,
    seed: int,
    *,
    on_epoch: engine.EpochCallback | None = None,
) -> engine.CVResult:
    """Cross-validate one config: the one call a trial, and a replay of it, make."""
    return stacked.auto_cross_validate(
        config,
        folds,
        task=dev.task,
        n_classes=dev.n_classes,
        metric=metrics.get(spec.metric),
        training=spec.training,
        seed=seed,
        on_epoch=on_epoch,
    )
