"""scikit-learn estimators that search: `MLPSearchClassifier` and `MLPSearchRegressor`.

`fit(X, y)` runs a selector study on the given rows and refits the chosen config on all of them,
so that the estimator is what `cross_val_score`, a `Pipeline` or a grid search around it
evaluates: every row is a dev row, and no test set is held back (`data.test_size = 0`; the
caller's own split or cross-validation scores the estimator). Choosing among the trials by
their K-fold CV score is the estimator's inner loop, as in `GridSearchCV`.

How the rows reach the study: `X` and `y` are written to a Parquet file in a temporary
directory, and the study's spec names it in `data.path`. So the study sees exactly what a study
file's data would give it (the same checks, preprocessing fit inside each fold, fingerprints),
and worker processes (`workers > 1`) read the same file. Parquet keeps the frame's dtypes:
categories, booleans, missing values. The directory, and the temporary SQLite database of the
search (the default `storage`), are removed when `fit` returns; the fitted estimator holds the
refit network's weights (numpy arrays) and the preprocessing statistics, never a connection, so
it pickles.

Seeded: with the default storage, two fits on the same rows give the same model.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data

from selector import api, data
from selector import spec as specs
from selector import storage as stores
from selector.errors import DataError, SpecError
from selector.metrics import Task

if TYPE_CHECKING:
    from typing import Self

    from selector.record import TrialRecord
    from selector.spec import StudySpec

# A fit's temporary directory (its name's start) and the file of its rows in it.
FOLDER, ROWS = "selector-fit-", "rows.parquet"

# The parameters that a study table holds under another name: SpecError's messages name the
# parameter.
SETTINGS = {
    "folds": "cv.folds",
    "max_epochs": "training.max_epochs",
    "patience": "training.patience",
    "device": "training.device",
    "sampler": "search.sampler",
    "pruner": "search.pruner",
}

# The search space when none is given: depth, width, regularisation and learning rate.
DEFAULT_SPACE: dict[str, Any] = {
    "depth": {"low": 1, "high": 3},
    "width": {"low": 16, "high": 256, "log": True},
    "dropout": {"low": 0.0, "high": 0.3},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "batch_size": [32, 64, 128],
}


class _MLPSearch(BaseEstimator):
    """The search settings (stored by `__init__`, checked by `fit`) and what both estimators
    fit and predict."""

    _task: ClassVar[Task]
    _metric: ClassVar[str]

    def __init__(
        self,
        *,
        space: dict[str, Any] | None = None,
        folds: int = 5,
        n_trials: int = 20,
        metric: str | None = None,
        max_epochs: int = 60,
        patience: int = 8,
        sampler: str = "tpe",
        pruner: str = "median",
        seed: int = 0,
        storage: str | None = None,
        workers: int = 1,
        device: str = "auto",
        verbose: bool = False,
    ) -> None:
        self.space = space
        self.folds = folds
        self.n_trials = n_trials
        self.metric = metric
        self.max_epochs = max_epochs
        self.patience = patience
        self.sampler = sampler
        self.pruner = pruner
        self.seed = seed
        self.storage = storage
        self.workers = workers
        self.device = device
        self.verbose = verbose

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # imputed, inside each fold
        tags.input_tags.categorical = True  # a DataFrame's categorical columns, one-hot encoded
        return tags

    # -- fit

    def fit(self, X: Any, y: Any) -> Self:
        """Search on the rows of `X` (a DataFrame, categorical columns and missing values
        allowed, or a numeric array) and `y`, then refit the best trial's config on all of them
        for its best epoch count."""
        frame = self._features(X, reset=True)
        target = self._target(y, len(frame))
        self._check_workers()
        self._check_rows(len(frame))
        self._check_data(frame, target)
        with _as_value_error(), _workspace(self.storage) as (folder, url):
            s = self._spec(folder, frame, target)
            self._check_metric(s.metric)
            self._search(s, url)
            records = api.trials(s, storage=url)
            chosen = _best(records, s.name)
            self._refit(s, chosen)
            self.study_ = {
                "name": s.name,
                "storage": stores.mask(url) if self.storage is not None else None,
            }
        self._results(records, chosen)
        return self

    def _check_workers(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int | np.integer):
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")

    def _check_rows(self, n: int) -> None:
        folds = self.folds if isinstance(self.folds, int | np.integer) else 2
        if n < 2 * folds:
            raise ValueError(
                f"n_samples = {n}: too few rows for {folds}-fold cross-validation "
                f"(at least {2 * folds}); lower folds or give more rows"
            )

    def _check_data(self, frame: pd.DataFrame, target: np.ndarray) -> None:
        """What the study would refuse in these rows, said in the estimator's terms (X, y and its
        parameters, not a study file's), before any file or study exists."""
        with _as_value_error():
            data.check_features(frame, "X", lambda col: f"drop column {col!r} from X")
        self._check_target(target)

    def _check_target(self, target: np.ndarray) -> None:
        raise NotImplementedError

    def _check_metric(self, metric: str) -> None:
        """The metric must score this estimator's task (`f1`: a classifier of two classes)."""
        n_classes = len(getattr(self, "classes_", ()))
        misfit = data.metric_misfit(metric, self._task, n_classes)
        if misfit is not None:
            problem, fix = misfit
            raise ValueError(f"{problem}; {fix}")

    def _target(self, y: Any, n: int) -> np.ndarray:
        """`y` checked (1-d, one value per row, finite), as the study's target column."""
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None"
            )
        values = column_or_1d(y, warn=True)
        if len(values) != n:
            raise ValueError(
                f"Found input variables with inconsistent numbers of samples: [{n}, {len(values)}]"
            )
        numeric = "numeric" if self._task == "regression" else None
        return check_array(values, ensure_2d=False, dtype=numeric, input_name="y")  # type: ignore[no-any-return]

    def _features(self, X: Any, *, reset: bool) -> pd.DataFrame:
        """`X` as a frame with string column names: a DataFrame's own columns (their names are
        `feature_names_in_` when they are strings), or `x0, x1, ...` for an array."""
        if isinstance(X, pd.DataFrame):
            validate_data(self, X, reset=reset, skip_check_array=True)
            if X.shape[0] < 1 or X.shape[1] < 1:
                raise ValueError(
                    f"Found array with {X.shape[0]} sample(s) and {X.shape[1]} feature(s) "
                    "while a minimum of 1 is required."
                )
            frame = X.reset_index(drop=True)
            frame.columns = [str(c) for c in X.columns]
        else:
            array = validate_data(
                self, X, reset=reset, dtype="numeric", ensure_all_finite="allow-nan"
            )
            frame = pd.DataFrame(array, columns=[f"x{i}" for i in range(array.shape[1])])
        named = isinstance(X, pd.DataFrame) and hasattr(self, "feature_names_in_")
        if not reset and not named:  # checked against the fit's names, else taken by position
            frame.columns = list(self.preprocess_.columns)
        return frame

    def _spec(self, folder: Path, frame: pd.DataFrame, target: np.ndarray) -> StudySpec:
        """The study of this fit: its rows in a Parquet file in `folder`, no test set."""
        column = _free_name("target", frame.columns)
        path = folder / ROWS
        _write_parquet(frame.assign(**{column: self._encode(target)}), path)
        raw: dict[str, Any] = {
            "name": f"{type(self).__name__}-{uuid.uuid4().hex[:12]}",
            "metric": self.metric if self.metric is not None else self._metric,
            "n_trials": self.n_trials,
            "seed": self.seed,
            "data": {"path": path.name, "target": column, "task": self._task, "test_size": 0.0},
            "space": self.space if self.space is not None else DEFAULT_SPACE,
        }
        for param, setting in SETTINGS.items():
            section, key = setting.split(".")
            raw.setdefault(section, {})[key] = getattr(self, param)
        return specs.parse(_native(raw), origin=type(self).__name__, base_dir=str(folder))

    def _encode(self, target: np.ndarray) -> np.ndarray:
        """The target column the study reads (class codes for a classifier)."""
        return target.astype(np.float64)

    def _search(self, s: StudySpec, url: str) -> None:
        import torch

        api.run(
            s,
            storage=url,
            workers=int(self.workers),
            # one worker: this process's torch threads, as for any torch code it runs (within
            # what a worker may take: a caller's torch may have been set to more)
            threads=min(torch.get_num_threads(), api.max_threads()) if self.workers == 1 else None,
            progress=bool(self.verbose),
        )

    def _refit(self, s: StudySpec, chosen: TrialRecord) -> None:
        """The chosen config trained on all the rows for the chosen trial's best epoch count,
        as `selector final` refits on all dev rows (`final._refit_and_score`), with the same
        seed; kept as numpy weights and plain preprocessing statistics."""
        from selector import artifact, data, final

        dev = data.dev_set(data.prepare(s))
        config = chosen.config(s.space)
        pre, (x,) = data.fit_transform(dev.X)
        epochs = int(chosen.best_epoch or 1)
        model, mean, std = final.refit(
            s, config, x, dev.y, task=self._task, n_classes=dev.n_classes, epochs=epochs
        )
        self.weights_ = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        self.preprocess_ = artifact.from_sklearn(pre, [str(c) for c in dev.X.columns])
        self.best_config_ = config.as_dict()
        self.best_epoch_ = epochs
        self.y_mean_, self.y_std_ = mean, std

    def _results(self, records: list[TrialRecord], chosen: TrialRecord) -> None:
        shown = [r for r in records if r.state.is_finished()]
        self.cv_results_ = cv_results(shown, int(self.folds))
        self.best_index_ = next(i for i, r in enumerate(shown) if r.number == chosen.number)
        self.best_params_ = dict(chosen.params)
        self.best_score_ = float(chosen.value)  # type: ignore[arg-type]
        self.n_splits_ = int(self.folds)

    # -- predict

    def _outputs(self, X: Any) -> np.ndarray:
        """Class probabilities, or values on the target's scale, for the rows of `X`."""
        check_is_fitted(self)
        import torch

        from selector import artifact, engine
        from selector.model import build_mlp
        from selector.space import TrialConfig

        frame = self._features(X, reset=False)
        try:
            x, _ = artifact.transform(self.preprocess_, frame)
        except DataError as e:
            raise ValueError(str(e)) from None
        n_out = len(self.classes_) if self._task == "classification" else 1
        net = build_mlp(TrialConfig(**self.best_config_), self.preprocess_.n_features, n_out)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in self.weights_.items()})
        return engine.predict(
            net, torch.as_tensor(x), task=self._task, y_mean=self.y_mean_, y_std=self.y_std_
        )


class MLPSearchClassifier(ClassifierMixin, _MLPSearch):
    """An MLP classifier whose config is searched by K-fold CV (a selector study) at `fit`.

    `space` is a study file's `[space]` as a dict (default `DEFAULT_SPACE`); `metric` chooses
    among the trials (default accuracy); `score` is accuracy, as for every scikit-learn
    classifier. Fitted: `classes_`, `best_params_`, `best_score_`, `best_index_`,
    `cv_results_` (scikit-learn's layout, one entry per trial), `best_config_`, `best_epoch_`,
    `n_features_in_`, `feature_names_in_` (a DataFrame's), `study_` (name, and storage unless
    temporary)."""

    _task = "classification"
    _metric = "accuracy"

    def _target(self, y: Any, n: int) -> np.ndarray:
        values = super()._target(y, n)
        check_classification_targets(values)
        self.classes_, codes = np.unique(values, return_inverse=True)
        if len(self.classes_) < 2:
            only = self.classes_[0]
            shown = only.item() if isinstance(only, np.generic) else only
            raise ValueError(f"y has 1 class ({shown!r}); a classifier needs at least 2 classes")
        return codes.astype(np.int64)  # type: ignore[no-any-return]

    def _check_target(self, target: np.ndarray) -> None:
        """Every class in each of the K folds' training rows: at least `folds` rows a class."""
        folds = self.folds if isinstance(self.folds, int | np.integer) else 2
        counts = np.bincount(target, minlength=len(self.classes_))
        rare = int(counts.argmin())
        if counts[rare] < folds:
            label = self.classes_[rare]
            shown = label.item() if isinstance(label, np.generic) else label
            raise ValueError(
                f"y: class {shown!r} has {_rows(counts[rare])}, fewer than folds = {folds}, so some "
                "fold would train without it; lower folds or leave out that class's rows"
            )

    def _encode(self, target: np.ndarray) -> np.ndarray:
        return target

    def predict_proba(self, X: Any) -> np.ndarray:
        """Each class's probability (columns in the order of `classes_`; rows sum to 1)."""
        return self._outputs(X)

    def predict(self, X: Any) -> np.ndarray:
        proba = self._outputs(X)  # first: it says when the estimator is not fitted
        return self.classes_[proba.argmax(axis=1)]  # type: ignore[no-any-return]


class MLPSearchRegressor(RegressorMixin, _MLPSearch):
    """An MLP regressor whose config is searched by K-fold CV (a selector study) at `fit`.

    As `MLPSearchClassifier`; `metric` defaults to r2, and `score` is R², as for every
    scikit-learn regressor. The target is standardised for training and predictions are on its
    own scale."""

    _task = "regression"
    _metric = "r2"

    def _check_target(self, target: np.ndarray) -> None:
        if np.all(target == target[0]):
            raise ValueError(f"y is constant ({target[0].item()!r}); nothing to learn")
        with _as_value_error():
            data.check_magnitude(pd.Series(target), "y", "", "")

    def predict(self, X: Any) -> np.ndarray:
        return self._outputs(X)


# --- the search's results, in scikit-learn's layout ----------------------------------------------


def cv_results(records: list[TrialRecord], folds: int) -> dict[str, Any]:
    """`cv_results_` as `GridSearchCV` lays it out, one entry per trial (complete, pruned or
    failed; scores a trial did not reach are NaN, ranked last): `params`, `param_NAME` (masked
    where a trial has no such param), `split{k}_test_score`, `mean_test_score` (the trial's
    value), `std_test_score`, `rank_test_score`, the same for the train score (no rank), and
    selector's own `trial_number`, `state`, `best_epoch`, `n_params`."""
    out: dict[str, Any] = {"params": [dict(r.params) for r in records]}
    for name in sorted({p for r in records for p in r.params}):
        out[f"param_{name}"] = np.ma.MaskedArray(
            [r.params.get(name) for r in records],
            mask=[name not in r.params for r in records],
            dtype=object,
        )
    for kind in ("test", "train"):
        splits = np.full((len(records), folds), np.nan)
        for i, r in enumerate(records):
            scores = r.fold_scores if kind == "test" else r.train_fold_scores
            if r.complete and len(scores) == folds:
                splits[i] = scores
        out |= {f"split{k}_{kind}_score": splits[:, k] for k in range(folds)}
        out[f"mean_{kind}_score"] = np.array(
            [_mean(r, kind) if r.complete else np.nan for r in records]
        )
        out[f"std_{kind}_score"] = np.array(
            [float(np.std(row)) if not np.isnan(row).any() else np.nan for row in splits]
        )
    out["rank_test_score"] = _ranks(out["mean_test_score"])
    out["trial_number"] = np.array([r.number for r in records])
    out["state"] = np.array([r.state.name.lower() for r in records], dtype=object)
    out["best_epoch"] = np.array([r.best_epoch or 0 for r in records])
    out["n_params"] = np.array([r.n_params or 0 for r in records])
    return out


def _mean(r: TrialRecord, kind: str) -> float:
    """A complete trial's mean CV score (its value) or mean train score, at its best epoch."""
    return float(r.value) if kind == "test" else r.train_score  # type: ignore[arg-type]


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 for the best; ties share the lowest rank; NaN (no score) ranks after every score."""
    from scipy.stats import rankdata

    filled = np.where(np.isnan(scores), -np.inf, scores)
    return rankdata(-filled, method="min").astype(np.int32)  # type: ignore[no-any-return]


def _best(records: list[TrialRecord], name: str) -> TrialRecord:
    """The complete trial with the best mean CV score (ties: the earlier trial)."""
    from selector import record

    done = record.complete(records)
    if not done:
        states = ", ".join(
            f"trial {r.number} {r.state.name.lower()}"
            + (f" ({r.fail_reason}: {_last_line(r.error)})" if r.fail_reason else "")
            for r in records
        )
        raise RuntimeError(f"study {name!r}: no trial of the search completed: {states}")
    return done[0]


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no detail"


# --- the temporary files of a fit ----------------------------------------------------------------


@contextlib.contextmanager
def _workspace(storage: str | None) -> Iterator[tuple[Path, str]]:
    """A temporary directory for the fit's rows and, without `storage`, its SQLite database;
    removed afterwards, the database's pooled connections closed first."""
    folder = Path(tempfile.mkdtemp(prefix=FOLDER))
    url = stores.resolve_url(storage) if storage is not None else f"sqlite:///{folder / 'db'}"
    try:
        yield folder, url
    finally:
        if storage is None:
            _release(url)
        shutil.rmtree(folder, ignore_errors=True)


def _release(url: str) -> None:
    """Close the connections the process pooled for `url` (engines are cached per URL for the
    life of the process), so that no descriptor stays open on the deleted file. Optuna's
    storages first: opening them (cached) connects through selector's own engine."""
    from selector.storage import Heartbeat

    for beat in (None, Heartbeat()):
        with contextlib.suppress(Exception):  # clean-up never hides the fit's own error
            store = stores.open_storage(url, must_exist=True, heartbeat=beat)
            getattr(store, "engine").dispose()  # noqa: B009 - an RDBStorage's engine
    with contextlib.suppress(Exception):
        stores.engine(url).dispose()


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    try:
        frame.to_parquet(path, index=False)
    except ImportError:
        raise ImportError(
            "the estimators pass their rows to the study as a Parquet file, which needs "
            "pyarrow: pip install 'selector[parquet]'"
        ) from None
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid, ArrowTypeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"X cannot be stored as a table: {first}") from None


def _rows(n: int) -> str:
    return "1 row" if n == 1 else f"{n} rows"


def _free_name(name: str, taken: Any) -> str:
    """`name`, or `name_1`, `name_2`, ...: the first not among the feature columns."""
    used = {str(c) for c in taken}
    return next(
        n for n in (name, *(f"{name}_{i}" for i in range(1, len(used) + 2))) if n not in used
    )


def _native(value: Any) -> Any:
    """Settings as a study table holds them: numpy scalars and arrays (a grid's values) as
    Python's numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _native(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_native(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


@contextlib.contextmanager
def _as_value_error() -> Iterator[None]:
    """A bad setting (`SpecError`) or unusable rows (`DataError`) is a `ValueError`, as
    scikit-learn estimators raise for bad input."""
    try:
        yield
    except (SpecError, DataError) as e:
        message = re.sub(rf"\S*{FOLDER}[^/\s]*/{ROWS}", "the rows given to fit", str(e))
        for param, setting in SETTINGS.items():  # a setting named as the parameter that set it
            message = message.replace(f": {setting}: ", f": {param}: ")
        raise ValueError(message) from None
