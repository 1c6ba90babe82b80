"""What a study and its trials recorded, read back as typed records: the read side of selector.

`TrialRecord` is the one shape of a trial's results. The objective writes it (`to_user_attrs`,
`to_system_attrs`); every view reads it back with `from_trial`. User attrs hold the small facts a
person looks at in optuna-dashboard or `optuna trials` (seeds, fold scores, train scores, epochs,
seconds, the failure); the per-epoch curves and gradient norms go, packed, into the trial's system
attrs (`selector:curves`), which the dashboard does not ship to the browser. The out-of-fold
predictions of complete trials (what the bias-corrected estimate bootstraps) live in selector's own
table `selector_oof`. The diagnosis is not recorded: it depends on the rest of the study, so every
view computes it when it shows it (`selector.diagnose`).

Everything here only reads the database (the study's record, its trials, the stored final result,
the recorded choice), so `status`, `studies`, `export`, `report` and `dashboard` import neither
torch nor the engine.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import datetime as dt
import json
import math
import time
import weakref
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from selector import db, storage
from selector.errors import StudyError
from selector.space import TrialConfig, replay_config
from selector.spec import SpaceSpec, StudySpec, from_record

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A waiting trial (a stale trial's retry) is not counted: `ask` runs it instead of a new one.
ACTIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

CURVES_ATTR = "selector:curves"
HEARTBEAT_ATTR = "selector:heartbeat"
ATTR_SPEC, ATTR_BASE_DIR = "selector:spec", "selector:base_dir"
ATTR_FINGERPRINTS, ATTR_BUDGET = "selector:fingerprints", "selector:n_trials"
ATTR_BASELINE = "baseline_score"


def shown_time(iso: str | None) -> str:
    """A stored time as messages show it: to the second, in UTC (databases store naive UTC)."""
    if not iso:
        return "-"
    t = dt.datetime.fromisoformat(iso)
    t = t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


# --- a study's record ------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRecord:
    """A study's row in `selector_studies`."""

    name: str
    spec: StudySpec
    spec_hash: str
    fingerprints: dict[str, str]
    n_trials: int
    versions: dict[str, str]
    created_at: dt.datetime


def _row_to_record(row: Any, origin: str) -> StudyRecord:
    return StudyRecord(
        name=row.study_name,
        spec=from_record(json.loads(row.spec_json), row.base_dir, origin=origin),
        spec_hash=row.spec_hash,
        fingerprints={"data": row.data_fp, "split": row.split_fp, "folds": row.folds_fp},
        n_trials=row.n_trials,
        versions=json.loads(row.versions_json),
        created_at=row.created_at,
    )


def find_record(url: str, name: str) -> StudyRecord | None:
    row = db.read_one(url, sa.select(db.studies).where(db.studies.c.study_name == name))
    return None if row is None else _row_to_record(row, f"study {name!r} (recorded spec)")


def load_record(url: str, name: str) -> StudyRecord:
    """The record of an existing study; a clear error naming the studies that do exist if not."""
    rec = find_record(url, name)
    if rec is None:
        names = [r[0] for r in db.read_all(url, sa.select(db.studies.c.study_name))]
        known = f"; studies here: {', '.join(names)}" if names else "; this storage has no studies"
        raise StudyError(f"no study {name!r} in {storage.mask(url)}{known}")
    return rec


def load_study(store: optuna.storages.BaseStorage, url: str, name: str, **kw: Any) -> optuna.Study:
    """`optuna.load_study`, with a clear error naming the studies that exist."""
    try:
        return optuna.load_study(study_name=name, storage=store, **kw)
    except KeyError:
        names = [s.study_name for s in store.get_all_studies()]  # no trial read
        known = f"; studies here: {', '.join(names)}" if names else "; this storage has no studies"
        raise StudyError(f"no study {name!r} in {storage.mask(url)}{known}") from None


def open_study(url: str, name: str) -> tuple[optuna.Study, StudyRecord]:
    """An existing study for reading; never creates a database, never changes a trial. Its
    trials are read with selector's reader (`refresh`)."""
    study = load_study(storage.open_storage(url, must_exist=True), url, name)
    refresh(study)
    return study, load_record(url, name)


# --- trial states ----------------------------------------------------------------------------


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


# --- a trial's record ------------------------------------------------------------------------


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array, "<f4").tobytes())).decode()


def _unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), "<f4")
    return raw.astype(np.float64).reshape(shape)


@dataclass(frozen=True, eq=False)
class Curves:
    """Per-epoch curves of a trial: each fold's validation score (K, E), the mean training loss
    (E,), and each layer's gradient norm at the first batch of the epoch, mean over folds (E, L),
    input layer first. Stored as float32."""

    folds: np.ndarray
    loss: np.ndarray
    grads: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Curves):
            return NotImplemented
        pairs = ((self.folds, other.folds), (self.loss, other.loss), (self.grads, other.grads))
        return all(np.array_equal(a, b) for a, b in pairs)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # the arrays are in the fields; a trial's repr stays readable
        k, e = self.folds.shape if self.folds.ndim == 2 else (0, 0)
        return f"Curves(folds={k}, epochs={e}, layers={self.grads.shape[-1] if e else 0})"

    @property
    def val(self) -> np.ndarray:
        """The mean validation score per epoch (what the pruner and early stopping watched)."""
        return self.folds.mean(axis=0) if self.folds.size else np.zeros(0)

    def encode(self) -> dict[str, Any]:
        k, e = self.folds.shape
        layers = self.grads.shape[1] if self.grads.ndim == 2 else 0
        return {
            "v": 1,
            "folds": k,
            "epochs": e,
            "layers": layers,
            "scores": _pack(self.folds),
            "loss": _pack(self.loss),
            "grads": _pack(self.grads),
        }

    @classmethod
    def decode(cls, d: dict[str, Any]) -> Curves:
        k, e, layers = int(d["folds"]), int(d["epochs"]), int(d["layers"])
        return cls(
            _unpack(d["scores"], (k, e)), _unpack(d["loss"], (e,)), _unpack(d["grads"], (e, layers))
        )


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else (round(float(x), digits) if math.isfinite(x) else float(x))


@dataclass(frozen=True)
class TrialRecord:
    """What one trial recorded. Fields a trial has not reached (a pruned or failed trial has no
    fold scores) are empty or None."""

    number: int
    state: TrialState
    value: float | None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    fold_seeds: tuple[int, ...] = ()
    worker: int | None = None
    group: int | None = None  # a fused trial: its claim's first trial number and its size
    group_size: int | None = None
    fused_model: int | None = None  # the first trial number of the model it trained in
    n_params: int | None = None
    fold_scores: tuple[float, ...] = ()
    train_fold_scores: tuple[float, ...] = ()
    best_epoch: int | None = None
    epochs_run: int | None = None
    pruned_at_epoch: int | None = None
    seconds: float | None = None
    fail_reason: str | None = None
    error: str | None = None
    curves: Curves | None = None
    datetime_complete: dt.datetime | None = None

    # -- derived facts, never stored twice
    @property
    def complete(self) -> bool:
        """A complete trial with its scores recorded."""
        return (
            self.state == TrialState.COMPLETE and self.value is not None and bool(self.fold_scores)
        )

    @property
    def cv_std(self) -> float:
        return float(np.std(self.fold_scores)) if self.fold_scores else float("nan")

    @property
    def standard_error(self) -> float:
        """Standard error of the mean CV score (0 with fewer than two folds)."""
        k = len(self.fold_scores)
        return float(np.std(self.fold_scores, ddof=1) / math.sqrt(k)) if k >= 2 else 0.0

    @property
    def train_score(self) -> float:
        return float(np.mean(self.train_fold_scores)) if self.train_fold_scores else float("nan")

    @property
    def gap(self) -> float:
        """Generalization gap: train − validation score, mean over folds at the best epoch."""
        return self.train_score - (self.value if self.value is not None else float("nan"))

    @property
    def fold_gaps(self) -> np.ndarray:
        return np.subtract(self.train_fold_scores, self.fold_scores)

    def config(self, space: SpaceSpec) -> TrialConfig:
        """The trial's config, rebuilt from its params through the search space (as it was
        sampled): the one way every command rebuilds a chosen config."""
        return replay_config(self.params, space)

    # -- storage
    def to_user_attrs(self) -> dict[str, Any]:
        """The user attrs this record sets (only the fields it has)."""
        out: dict[str, Any] = {
            "seed": self.seed,
            "fold_seeds": list(self.fold_seeds) or None,
            "worker": self.worker,
            "group": self.group,
            "group_size": self.group_size,
            "fused_model": self.fused_model,
            "n_params": self.n_params,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "pruned_at_epoch": self.pruned_at_epoch,
            "seconds": _round(self.seconds, 3),
            "fail_reason": self.fail_reason,
            "error": self.error,
        }
        if self.fold_scores:
            out |= {
                "fold_scores": [_round(x) for x in self.fold_scores],
                "train_fold_scores": [_round(x) for x in self.train_fold_scores],
                # shown as columns in optuna-dashboard; derived, so never read back
                "cv_std": _round(self.cv_std),
                "train_score": _round(self.train_score),
                "gap": _round(self.gap),
            }
        return {k: v for k, v in out.items() if v is not None}

    def to_system_attrs(self) -> dict[str, Any]:
        return {} if self.curves is None else {CURVES_ATTR: self.curves.encode()}

    @classmethod
    def from_trial(cls, t: FrozenTrial) -> TrialRecord:
        return cls.from_parts(
            number=t.number,
            state=t.state,
            value=t.value,
            params=dict(t.params),
            user_attrs=t.user_attrs,
            system_attrs=t.system_attrs,
            datetime_complete=t.datetime_complete,
        )

    @classmethod
    def from_parts(
        cls,
        *,
        number: int,
        state: TrialState,
        value: float | None,
        params: dict[str, Any],
        user_attrs: dict[str, Any],
        system_attrs: dict[str, Any],
        datetime_complete: dt.datetime | None = None,
    ) -> TrialRecord:
        """A record from what Optuna stores of a trial (by `from_trial` or `read_trials`)."""
        a = user_attrs
        packed = system_attrs.get(CURVES_ATTR)
        return cls(
            number=number,
            state=state,
            value=value,
            params=params,
            seed=_int(a.get("seed")),
            fold_seeds=tuple(int(s) for s in a.get("fold_seeds") or ()),
            worker=_int(a.get("worker")),
            group=_int(a.get("group")),
            group_size=_int(a.get("group_size")),
            fused_model=_int(a.get("fused_model")),
            n_params=_int(a.get("n_params")),
            fold_scores=tuple(float(x) for x in a.get("fold_scores") or ()),
            train_fold_scores=tuple(float(x) for x in a.get("train_fold_scores") or ()),
            best_epoch=_int(a.get("best_epoch")),
            epochs_run=_int(a.get("epochs_run")),
            pruned_at_epoch=_int(a.get("pruned_at_epoch")),
            seconds=a.get("seconds"),
            fail_reason=str(a.get("fail_reason", "stale")) if state == TrialState.FAIL else None,
            error=a.get("error"),
            curves=Curves.decode(packed) if isinstance(packed, dict) else None,
            datetime_complete=datetime_complete,
        )


def best_scores(complete: Iterable[FrozenTrial]) -> tuple[float, float]:
    """The study's best mean CV score and best training score (`TrialRecord.train_score`) among
    `complete` trials with their scores recorded (`TrialRecord.complete`; -inf for none): what
    a trial's diagnosis is measured against."""
    best_val = best_train = -math.inf
    for t in complete:
        r = TrialRecord.from_parts(  # no curves: only the scores are read
            number=t.number,
            state=t.state,
            value=t.value,
            params={},
            user_attrs=t.user_attrs,
            system_attrs={},
        )
        if not r.complete:
            continue
        best_val = max(best_val, float(r.value))  # type: ignore[arg-type]
        if not math.isnan(r.train_score):
            best_train = max(best_train, r.train_score)
    return best_val, best_train


def _int(x: Any) -> int | None:
    return None if x is None else int(x)


def trials(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    """Every trial of the study (or those in `states`) as records, in trial-number order."""
    return [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False, states=states)]


# Optuna's RDB tables, as far as the read-only views read them (Core only: importing Optuna's ORM
# models costs about 0.13 s, a third of `import optuna`). Optuna stores enums by name.
_optuna = sa.MetaData()
_c = sa.Column


def _attrs_table(name: str, owner: str) -> sa.Table:
    """One of Optuna's key/JSON-value attribute tables, owned by a study or a trial."""
    return sa.Table(name, _optuna, _c(owner, sa.Integer), _c("key"), _c("value_json"))


_studies_t = sa.Table("studies", _optuna, _c("study_id", sa.Integer), _c("study_name", sa.String))
_study_attrs_t = _attrs_table("study_user_attributes", "study_id")
_directions_t = sa.Table(
    "study_directions",
    _optuna,
    _c("study_id", sa.Integer),
    _c("direction", sa.String),
    _c("objective", sa.Integer),
)
_trials_t = sa.Table(
    "trials",
    _optuna,
    _c("trial_id", sa.Integer),
    _c("number", sa.Integer),
    _c("study_id", sa.Integer),
    _c("state", sa.String),
    _c("datetime_start", sa.DateTime),
    _c("datetime_complete", sa.DateTime),
)
_intermediate_t = sa.Table(
    "trial_intermediate_values",
    _optuna,
    _c("trial_id", sa.Integer),
    _c("step", sa.Integer),
    _c("intermediate_value", sa.Float),
    _c("intermediate_value_type", sa.String),
)
_user_attrs_t = _attrs_table("trial_user_attributes", "trial_id")
_system_attrs_t = _attrs_table("trial_system_attributes", "trial_id")
_params_t = sa.Table(
    "trial_params",
    _optuna,
    _c("trial_id", sa.Integer),
    _c("param_name"),
    _c("param_value", sa.Float),
    _c("distribution_json"),
)
_values_t = sa.Table(
    "trial_values",
    _optuna,
    _c("trial_id", sa.Integer),
    _c("objective", sa.Integer),
    _c("value", sa.Float),
    _c("value_type", sa.String),
)
_beats_t = sa.Table(
    "trial_heartbeats", _optuna, _c("trial_id", sa.Integer), _c("heartbeat", sa.DateTime)
)
_INF = {"INF_POS": math.inf, "INF_NEG": -math.inf, "NAN": math.nan}


def frozen_trials(conn: sa.Connection, trial_ids: Any) -> list[FrozenTrial]:
    """The trials `trial_ids` (a subquery or list) as Optuna's `FrozenTrial`s, equal to what its
    storage reads, from six Core queries instead of its ORM loading (a tenth of the time for a
    fused group's running members: `refresh`)."""
    from optuna.distributions import json_to_distribution

    t = _trials_t.c
    rows = list(
        conn.execute(
            sa.select(t.trial_id, t.number, t.state, t.datetime_start, t.datetime_complete).where(
                t.trial_id.in_(trial_ids)
            )
        )
    )
    if not rows:
        return []
    user = _by_trial(conn, _user_attrs_t, trial_ids)
    system = _by_trial(conn, _system_attrs_t, trial_ids)
    p = _params_t.c
    params: dict[int, dict[str, Any]] = {}
    dists: dict[int, dict[str, Any]] = {}
    parsed: dict[str, Any] = {}
    for tid, name, value, dj in conn.execute(
        sa.select(p.trial_id, p.param_name, p.param_value, p.distribution_json).where(
            p.trial_id.in_(trial_ids)
        )
    ):
        dist = parsed.get(dj) or parsed.setdefault(dj, json_to_distribution(dj))
        params.setdefault(tid, {})[name] = dist.to_external_repr(value)
        dists.setdefault(tid, {})[name] = dist
    v = _values_t.c
    values: dict[int, dict[int, float]] = {}
    for tid, objective, value, kind in conn.execute(
        sa.select(v.trial_id, v.objective, v.value, v.value_type).where(v.trial_id.in_(trial_ids))
    ):
        values.setdefault(tid, {})[objective] = _INF.get(kind, value)
    i = _intermediate_t.c
    steps: dict[int, dict[int, float]] = {}
    for tid, step, value, kind in conn.execute(
        sa.select(i.trial_id, i.step, i.intermediate_value, i.intermediate_value_type).where(
            i.trial_id.in_(trial_ids)
        )
    ):
        steps.setdefault(tid, {})[step] = _INF.get(kind, value)
    out = []
    for tid, number, state, start, end in rows:
        vals = values.get(tid)
        out.append(
            FrozenTrial(
                number=number,
                state=TrialState[state],
                value=None,
                values=[vals[k] for k in sorted(vals)] if vals else None,
                datetime_start=start,
                datetime_complete=end,
                params=params.get(tid, {}),
                distributions=dists.get(tid, {}),
                user_attrs=user.get(tid, {}),
                system_attrs=system.get(tid, {}),
                intermediate_values=steps.get(tid, {}),
                trial_id=tid,
            )
        )
    return sorted(out, key=lambda f: f.number)


def refresh(study: optuna.Study, *, running: bool = True) -> None:
    """Bring Optuna's cache of the study's trials up to date as its cached storage would at
    each `get_trials` (every trial that was unfinished, and every newer one), with
    `frozen_trials`. Where the storage is not Optuna's cached RDB storage, its own refresh.
    A study's first read, every trial, is where this counts most: 8,800 trials in 0.6 s,
    against 7 s through Optuna's ORM (the same trials; workers and `open_study` read so).

    `running=False`, for readers of finished trials and of running trials' params only (the
    samplers, the median pruner, progress): one query reads the states, and a trial still
    running is read again only while its params are not cached yet (a worker writes a
    trial's params just after creating it), so its intermediate values and attrs may be
    stale. A fused group's members (16 running trials) cost 3.4 ms a read in full, 0.6 ms so."""
    store: Any = study._storage
    backend = getattr(store, "_backend", None)
    own = getattr(type(store), "_read_trials_from_remote_storage", None)
    if own is None:
        return
    if not isinstance(backend, optuna.storages.RDBStorage):
        own(store, study._study_id)
        return
    with store._lock:
        cache = store._studies.setdefault(
            study._study_id, optuna.storages._cached_storage._StudyInfo()
        )
        t = _trials_t.c
        wanted = sa.select(t.trial_id).where(
            t.study_id == study._study_id,
            sa.or_(
                t.trial_id.in_(sorted(cache.unfinished_trial_ids) or [-1]),
                t.trial_id > cache.last_finished_trial_id,
            ),
        )
        ended: list[int] = []  # finished trials: none need reading again
        with backend.engine.connect() as conn:
            if running:
                trials = frozen_trials(conn, wanted)
            else:
                states = [
                    (tid, TrialState[s]) for tid, s in conn.execute(wanted.add_columns(t.state))
                ]
                cache.unfinished_trial_ids.update(  # those not read again stay unfinished
                    tid for tid, state in states if not state.is_finished()
                )
                changed = []
                for tid, state in states:
                    cached = _cached(store, tid)
                    if cached is not None and cached.state.is_finished():
                        ended.append(tid)  # ended by this worker (`cache_finished`)
                    elif state.is_finished() or cached is None or not cached.params:
                        changed.append(tid)
                trials = frozen_trials(conn, changed) if changed else []
        store._add_trials_to_cache(study._study_id, trials)
        for trial in trials:
            if not trial.state.is_finished():
                cache.unfinished_trial_ids.add(trial._trial_id)
            else:
                ended.append(trial._trial_id)
        for tid in ended:
            cache.last_finished_trial_id = max(cache.last_finished_trial_id, tid)
            cache.unfinished_trial_ids.discard(tid)
        _READ_AT.setdefault(store, {})[study._study_id] = time.monotonic()


# Readers of finished trials only (the median pruner, a complete trial's best scores, the
# progress line) see other workers' trials at most this much later (`one_read`'s `within`): a
# penguins group's pruner reads at each of its epochs, about 50 times a second, and that read was
# about 4% of a run. What a worker ends is in its cache at once, so a lone worker reads the same.
FINISHED_READ_S = 1.0

# When this process last brought each study's cache up to date (`refresh`): storage -> study id
# -> `time.monotonic()`.
_READ_AT: weakref.WeakKeyDictionary[Any, dict[int, float]] = weakref.WeakKeyDictionary()


def cache_finished(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Put trials this worker just ended (`worker.end_trials`: what it wrote is what they hold;
    the cache keeps these objects, read-only from now on) into Optuna's cache, so that
    `refresh(running=False)` does not read them back: their states are still read, as every
    running trial's. Optuna's cache never reads a finished trial again either. Other storages:
    nothing."""
    store: Any = study._storage
    if not hasattr(store, "_add_trials_to_cache") or not trials:
        return
    with store._lock:
        store._studies.setdefault(study._study_id, optuna.storages._cached_storage._StudyInfo())
        store._add_trials_to_cache(study._study_id, trials)


class Finished:
    """A study's finished trials as this process's copy of Optuna's cache holds them, indexed as
    they finish (`finished_trials`): each look reads only the trials from the oldest one not yet
    finished on, instead of listing and sorting every trial (a median pruner's read and a
    progress line each did, about 1 ms at 5,000 trials, several times a group's epoch).

    Exact because a finished trial never changes: the complete trials at a given count are the
    same trials whenever this process sees that count, so a median over them is memoised by it,
    and each step's values, and the best scores (`best`), are gathered as trials complete."""

    def __init__(self) -> None:
        self.low = 0  # every trial numbered below is finished and indexed
        self.seen: set[int] = set()  # numbers from `low` on, finished and indexed already
        self.complete: list[FrozenTrial] = []  # by number
        self.ended: list[tuple[dt.datetime, int]] = []  # complete or pruned: (completion, number)
        self.at_step: dict[int, list[float]] = {}  # the complete trials' intermediate values
        self.best = (-math.inf, -math.inf)  # `best_scores` of the complete trials
        self._memo: dict[tuple[Any, ...], float] = {}
        self._memo_n = 0

    def update(self, trials: dict[int, FrozenTrial]) -> None:
        """Index what finished in `trials` (Optuna's cache of the study: number -> trial)."""
        top = len(trials)
        if top and top - 1 not in trials:  # numbers with a gap: go up to the largest
            top = max(trials) + 1
        held = False  # an older trial is still unfinished: `low` stays
        for n in range(self.low, top):
            t = trials.get(n)
            if t is None or not t.state.is_finished():
                held = True
                continue
            if n not in self.seen:
                if t.state == TrialState.COMPLETE:
                    bisect.insort(self.complete, t, key=lambda x: x.number)
                    for step, value in t.intermediate_values.items():
                        self.at_step.setdefault(step, []).append(value)
                    value, train = best_scores([t])
                    self.best = (max(self.best[0], value), max(self.best[1], train))
                if t.state in FINISHED and t.datetime_complete is not None:
                    bisect.insort(self.ended, (t.datetime_complete, n))
                self.seen.add(n)
            if not held:
                self.seen.discard(n)
                self.low = n + 1

    def percentile(
        self, direction: optuna.study.StudyDirection, step: int, q: float, n_min: int
    ) -> float:
        """Optuna's `_get_percentile_intermediate_result_over_trials` over the complete trials
        (the `q`th percentile of their values at `step`, from the top when maximizing; NaN
        with fewer than `n_min` values or none but NaN), once per count of complete trials."""
        if len(self.complete) != self._memo_n:
            self._memo, self._memo_n = {}, len(self.complete)
        key = (direction, step, q, n_min)
        if key not in self._memo:
            values = np.asarray(self.at_step.get(step, []), dtype=float)
            if len(values) < n_min or np.isnan(values).all():
                self._memo[key] = math.nan
            else:
                if direction == optuna.study.StudyDirection.MAXIMIZE:
                    q = 100 - q
                self._memo[key] = float(np.nanpercentile(values, q))
        return self._memo[key]


_FINISHED: weakref.WeakKeyDictionary[Any, dict[int, Finished]] = weakref.WeakKeyDictionary()


def finished_trials(study: optuna.Study) -> Finished | None:
    """The study's finished trials as Optuna's cache holds them now (`Finished`, brought up to
    date; read the study first, `refresh` or `one_read`). None where the storage keeps no such
    cache (in memory, a gRPC proxy's client): callers read `get_trials` there."""
    store: Any = study._storage
    if not isinstance(store, optuna.storages._cached_storage._CachedStorage):
        return None  # the in-memory storage has `_studies` too, its trials in a list
    with store._lock:
        info = store._studies.get(study._study_id)
        if info is None:
            return None
        index = _FINISHED.setdefault(store, {}).setdefault(study._study_id, Finished())
        index.update(info.trials)
    return index


def study_best(study: optuna.Study) -> tuple[float, float]:
    """The study's best mean CV score and best training score among its complete trials
    (`best_scores`, as `diagnose.of_study` takes them), gathered as trials complete
    (`Finished.best`) where Optuna's cache holds the study: another worker's trials are seen at
    most `FINISHED_READ_S` later, this worker's at once. Optuna's best-trial query scanned every
    complete trial and read the best one back: 2.6% of a penguins search."""
    with one_read(study, running=False, within=FINISHED_READ_S):
        finished = finished_trials(study)
        if finished is not None:
            return finished.best
        return best_scores(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _cached(store: Any, trial_id: int) -> FrozenTrial | None:
    """The trial as Optuna's cache holds it, or None."""
    where = store._trial_id_to_study_id_and_number.get(trial_id)
    if where is None:
        return None
    return store._studies[where[0]].trials.get(where[1])  # type: ignore[no-any-return]


@contextlib.contextmanager
def core_trial_reads(study: optuna.Study) -> Iterator[None]:
    """Within the block, a running trial that Optuna reads back by id (`study.tell` reads it
    twice) is read with `frozen_trials` instead of its ORM: about 2 ms instead of 10."""
    store: Any = study._storage
    backend = getattr(store, "_backend", None)
    if not isinstance(backend, optuna.storages.RDBStorage) or not hasattr(store, "_lock"):
        yield
        return
    own = store.get_trial

    def get_trial(trial_id: int) -> FrozenTrial:
        fresh = storage.take_fresh(store, trial_id)
        if fresh is not None:  # just created with others (`storage.new_trials`): read once
            return fresh  # type: ignore[no-any-return]
        with store._lock:
            cached = store._get_cached_trial(trial_id)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        with backend.engine.connect() as conn:
            found = frozen_trials(conn, [trial_id])
        return found[0] if found else own(trial_id)

    store.get_trial = get_trial
    try:
        yield
    finally:
        del store.get_trial


@contextlib.contextmanager
def one_read(study: optuna.Study, *, running: bool = True, within: float = 0.0) -> Iterator[None]:
    """Within the block, the study's trials as read once at its start (`refresh`, with
    `running`): Optuna's cached storage otherwise reads every running trial back through its
    ORM at each `get_trials` (each pruner decision, each parameter a sampler draws), about
    25 ms with a fused group's members running.

    `within` (seconds): where this process read the study that recently, its cache as it is,
    for readers of finished trials that may see another worker's trials that much later. What
    this worker ends is in its cache at once (`cache_finished`), so a lone worker reads the
    same either way."""
    store: Any = study._storage
    if (
        getattr(type(store), "_read_trials_from_remote_storage", None) is None
        or "_read_trials_from_remote_storage" in vars(store)  # within another: read already
    ):
        yield
        return
    last = _READ_AT.get(store, {}).get(study._study_id, -math.inf)
    if time.monotonic() - last >= within:
        refresh(study, running=running)
    store._read_trials_from_remote_storage = lambda study_id: None
    try:
        yield
    finally:
        del store._read_trials_from_remote_storage


def read_trials(url: str, name: str) -> tuple[dict[str, Any], list[TrialRecord]]:
    """The study's user attrs and every trial as a record, for read-only views: a handful of
    SQL queries on Optuna's own tables (its schema, read as its storage writes it; a test checks
    the result against `study.get_trials`), several times faster than `study.get_trials` at 500
    trials, which loads every attribute and intermediate value through the ORM after checking
    the schema's version. Through a gRPC proxy, Optuna's own calls."""
    if storage.is_grpc(url):
        study = load_study(storage.open_storage(url, must_exist=True), url, name)
        return dict(study.user_attrs), trials(study)
    storage.check(url, must_exist=True)
    with storage.engine(url).connect() as conn:
        study_id = _study_id(conn, url, name)
        attrs = {
            k: json.loads(v)
            for k, v in conn.execute(
                sa.select(_study_attrs_t.c.key, _study_attrs_t.c.value_json).where(
                    _study_attrs_t.c.study_id == study_id
                )
            )
        }
        t = _trials_t.c
        rows = list(
            conn.execute(
                sa.select(t.trial_id, t.number, t.state, t.datetime_complete).where(
                    t.study_id == study_id
                )
            )
        )
        of_study = sa.select(t.trial_id).where(t.study_id == study_id)
        user = _by_trial(conn, _user_attrs_t, of_study)
        system = _by_trial(conn, _system_attrs_t, of_study, key=CURVES_ATTR)
        params = _params(conn, of_study)
        v = _values_t.c
        values = {
            tid: _INF.get(kind, value)
            for tid, value, kind in conn.execute(
                sa.select(v.trial_id, v.value, v.value_type).where(
                    v.trial_id.in_(of_study), v.objective == 0
                )
            )
        }
    out = [
        TrialRecord.from_parts(
            number=number,
            state=TrialState[state],
            value=values.get(tid),
            params=params.get(tid, {}),
            user_attrs=user.get(tid, {}),
            system_attrs=system.get(tid, {}),
            datetime_complete=_local(done),
        )
        for tid, number, state, done in rows
    ]
    return attrs, sorted(out, key=lambda r: r.number)


def _study_id(conn: sa.Connection, url: str, name: str) -> int:
    s = _studies_t.c
    study_id = conn.execute(sa.select(s.study_id).where(s.study_name == name)).scalar()
    if study_id is None:
        names = list(conn.execute(sa.select(s.study_name)).scalars())
        known = f"; studies here: {', '.join(names)}" if names else "; this storage has no studies"
        raise StudyError(f"no study {name!r} in {storage.mask(url)}{known}")
    return int(study_id)


@dataclass(frozen=True)
class StudyOverview:
    """A study as a storage's list shows it: its trials, and its best value (None without a
    complete trial, or with several objectives)."""

    name: str
    trials: int
    best: float | None


def study_overviews(url: str) -> list[StudyOverview]:
    """Every study in the storage, in the order Optuna lists them, with its trial count and
    best value: four Core queries. (`optuna.get_all_study_summaries` loads every trial of every
    study, even without the best trial: 5 s at 4,800 trials.) Through a gRPC proxy, Optuna's."""
    if storage.is_grpc(url):
        store = storage.open_storage(url, must_exist=True)
        return [
            StudyOverview(s.study_name, s.n_trials, s.best_trial.value if s.best_trial else None)
            for s in optuna.get_all_study_summaries(store, include_best_trial=True)
        ]
    storage.check(url, must_exist=True)
    st, t, v, d = _studies_t.c, _trials_t.c, _values_t.c, _directions_t.c
    with storage.engine(url).connect() as conn:
        studies = list(conn.execute(sa.select(st.study_id, st.study_name).order_by(st.study_id)))
        counts = {
            int(sid): int(n)
            for sid, n in conn.execute(sa.select(t.study_id, sa.func.count()).group_by(t.study_id))
        }
        directions: dict[int, list[str]] = {}
        for sid, direction in conn.execute(
            sa.select(d.study_id, d.direction).order_by(d.objective)
        ):
            directions.setdefault(sid, []).append(direction)
        values: dict[int, list[float]] = {}
        complete = (
            sa.select(t.study_id, v.value, v.value_type)
            .select_from(_trials_t.join(_values_t, v.trial_id == t.trial_id))
            .where(t.state == TrialState.COMPLETE.name, v.objective == 0)
        )
        for sid, value, kind in conn.execute(complete):
            x = float(value) if kind == "FINITE" else _INF[kind]
            if not math.isnan(x):
                values.setdefault(sid, []).append(x)
    out = []
    for sid, name in studies:
        dirs, scores = directions.get(sid, []), values.get(sid)
        best = None
        if len(dirs) == 1 and scores:
            best = max(scores) if dirs[0] == "MAXIMIZE" else min(scores)
        out.append(StudyOverview(name, counts.get(sid, 0), best))
    return out


def state_counts(url: str, name: str) -> Counter[TrialState]:
    """How many of the study's trials are in each state: one query (through a gRPC proxy,
    Optuna's trials)."""
    if storage.is_grpc(url):
        study = load_study(storage.open_storage(url, must_exist=True), url, name)
        return Counter(t.state for t in study.get_trials(deepcopy=False))
    t = _trials_t.c
    with storage.engine(url).connect() as conn:
        study_id = _study_id(conn, url, name)
        query = sa.select(t.state, sa.func.count()).where(t.study_id == study_id).group_by(t.state)
        return Counter({TrialState[state]: int(n) for state, n in conn.execute(query)})


def silent_trials(url: str, name: str, default_grace: int = 120) -> list[int]:
    """Running trials whose heartbeat is older than the grace their worker recorded (or
    `default_grace`): their worker looks lost. Reading only; the workers reap them."""
    if storage.is_grpc(url):
        return []
    t, b, a = _trials_t.c, _beats_t.c, _system_attrs_t.c
    with storage.engine(url).connect() as conn:
        study_id = _study_id(conn, url, name)
        query = (
            sa.select(t.number, b.heartbeat, a.value_json, sa.func.now())
            .select_from(_trials_t)
            .join(_beats_t, b.trial_id == t.trial_id)
            .outerjoin(_system_attrs_t, (a.trial_id == t.trial_id) & (a.key == HEARTBEAT_ATTR))
            .where(t.study_id == study_id, t.state == TrialState.RUNNING.name)
        )
        rows = list(conn.execute(query))
    out = []
    for number, beat, recorded, now in rows:
        grace = json.loads(recorded).get("grace", default_grace) if recorded else default_grace
        if (_naive(now) - _naive(beat)).total_seconds() > grace:
            out.append(int(number))
    return sorted(out)


def _naive(t: Any) -> dt.datetime:
    """A database time as a naive UTC datetime (SQLite's CURRENT_TIMESTAMP is text)."""
    if isinstance(t, str):
        t = dt.datetime.fromisoformat(t)
    return t.replace(tzinfo=None)  # type: ignore[no-any-return]


def _local(utc: dt.datetime | None) -> dt.datetime | None:
    """Optuna's stored naive UTC as the naive local time its FrozenTrials carry."""
    if utc is None:
        return None
    return utc.replace(tzinfo=dt.UTC).astimezone().replace(tzinfo=None)


def _by_trial(
    conn: sa.Connection, table: sa.Table, of_study: Any, key: str | None = None
) -> dict[int, dict[str, Any]]:
    c = table.c
    query = sa.select(c.trial_id, c.key, c.value_json).where(c.trial_id.in_(of_study))
    if key is not None:
        query = query.where(c.key == key)
    out: dict[int, dict[str, Any]] = {}
    for tid, k, v in conn.execute(query):
        out.setdefault(tid, {})[k] = json.loads(v)
    return out


def _params(conn: sa.Connection, of_study: Any) -> dict[int, dict[str, Any]]:
    """Each trial's params in their external form (a categorical's choice, not its index)."""
    from optuna.distributions import json_to_distribution

    c = _params_t.c
    dists: dict[str, Any] = {}
    out: dict[int, dict[str, Any]] = {}
    query = sa.select(c.trial_id, c.param_name, c.param_value, c.distribution_json).where(
        c.trial_id.in_(of_study)
    )
    for tid, name, value, dj in conn.execute(query):
        dist = dists.get(dj) or dists.setdefault(dj, json_to_distribution(dj))
        out.setdefault(tid, {})[name] = dist.to_external_repr(value)
    return out


def complete(records: list[TrialRecord]) -> list[TrialRecord]:
    """The complete trials with their scores, best first (ties: the earlier trial)."""
    done = [r for r in records if r.complete]
    return sorted(done, key=lambda r: (-float(r.value), r.number))  # type: ignore[arg-type]


# --- out-of-fold predictions -----------------------------------------------------------------


# Rows of `selector_oof` that are not trials: the dev targets and each dev row's fold.
TARGET_ROW, FOLDS_ROW = -1, -2


def pack_oof(pred: np.ndarray, kind: str) -> bytes:
    """Out-of-fold predictions, compactly: labels as int16, probabilities as float16, values as
    float32 (an npy header keeps dtype and shape)."""
    import io

    dtype = {"labels": np.int16, "proba": np.float16, "values": np.float32}[kind]
    buf = io.BytesIO()
    np.save(buf, np.asarray(pred).astype(dtype), allow_pickle=False)
    return zlib.compress(buf.getvalue())


def unpack_oof(blob: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False)  # type: ignore[no-any-return]


def read_oof(url: str, name: str, numbers: list[int]) -> dict[int, np.ndarray]:
    """The stored out-of-fold predictions of the given trials (those that have them)."""
    if not numbers or storage.is_grpc(url):
        return {}
    rows = db.read_all(
        url,
        sa.select(db.oof.c.trial_number, db.oof.c.data).where(
            db.oof.c.study_name == name, db.oof.c.trial_number.in_(numbers)
        ),
    )
    return {int(r.trial_number): unpack_oof(r.data) for r in rows}


# --- the stored final result -----------------------------------------------------------------


@dataclass
class FinalResult:
    study: str
    state: str
    rule: str
    trial: int
    metric: str
    cv_score: float | None
    test_score: float | None
    test_rows: int | None
    claimed_at: str
    finished_at: str | None
    artifact: str | None
    resumed_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @property
    def lockbox_state(self) -> str:
        return "evaluated" if self.state == "finished" else "evaluation started, not finished"


def _final_result(row: Any) -> FinalResult:
    return FinalResult(
        study=row.study_name,
        state=row.state,
        rule=row.rule,
        trial=row.trial_number,
        metric=row.metric,
        cv_score=row.cv_score,
        test_score=row.test_score,
        test_rows=row.test_rows,
        claimed_at=row.claimed_at.isoformat(),
        finished_at=row.finished_at.isoformat() if row.finished_at else None,
        artifact=row.artifact,
        resumed_at=row.resumed_at.isoformat() if row.resumed_at else None,
    )


def stored_final(url: str, name: str) -> FinalResult | None:
    """The study's test-set evaluation (claimed or finished), or None while it is sealed."""
    row = db.read_one(url, sa.select(db.final).where(db.final.c.study_name == name))
    return None if row is None else _final_result(row)


# `final`'s mark in the study itself, beside its row in selector_final: what a worker that
# reaches the study through a gRPC proxy (Optuna's storage only, no selector tables) can read.
ATTR_OPENED = "selector:test_set_opened"


@dataclass(frozen=True)
class Opened:
    """When `final` claimed the study's test set, and for which trial."""

    claimed_at: str
    trial: int


def test_set_opened(url: str, study: optuna.Study) -> Opened | None:
    """Whether `final` has claimed the study's test set (then it takes no more trials): its row
    in selector_final, or through a gRPC proxy the mark `final` leaves in the study."""
    if storage.is_grpc(url):
        attrs = study._storage.get_study_system_attrs(study._study_id)
        mark = attrs.get(ATTR_OPENED)
        return None if mark is None else Opened(str(mark["claimed_at"]), int(mark["trial"]))
    prev = stored_final(url, study.study_name)
    return None if prev is None else Opened(prev.claimed_at, prev.trial)


def mark_opened(study: optuna.Study, opened: Opened) -> None:
    """Leave `final`'s claim in the study itself, for `test_set_opened` through a gRPC proxy."""
    value: dict[str, Any] = {"claimed_at": opened.claimed_at, "trial": opened.trial}
    study._storage.set_study_system_attr(study._study_id, ATTR_OPENED, value)


# --- a run's summary -------------------------------------------------------------------------


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
    # what was done to the data without being asked (`data.Prepared.notes`), one line each
    data_notes: tuple[str, ...] = ()


def data_notes(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The study's notes on what was done to its data (its `data_notes` user attr), from its
    user attrs: what `run` and `status` print."""
    return tuple(str(n) for n in attrs.get("data_notes") or ())


def summarize(study: optuna.Study, budget: int, *, ran: int = 0) -> RunSummary:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(done, key=value_of) if done else None
    return RunSummary(
        study=study.study_name,
        metric=str(study.user_attrs.get("metric", "score")),
        finished=count(study),
        budget=budget,
        ran=ran,
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        n_trials=study.user_attrs.get(ATTR_BUDGET),
        data_notes=data_notes(study.user_attrs),
    )
