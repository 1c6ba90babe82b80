"""Data: load a table, hold back the test rows, fix the K folds, preprocess inside each fold.

Only `load_test` ever materialises test rows, and only `final` calls it. Everything the search sees
comes from `load_dev`, whose rows are the dev part of the seeded split.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import datasets
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import (
    GroupKFold,
    GroupShuffleSplit,
    KFold,
    RepeatedKFold,
    RepeatedStratifiedKFold,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from selector import metrics
from selector.errors import DataError
from selector.metrics import Task
from selector.spec import DataSpec, StudySpec

MAX_CLASSES = 1000


@dataclass(frozen=True)
class Table:
    """Features and encoded target of every row, before the split."""

    X: pd.DataFrame
    y: np.ndarray  # int class codes, or float values
    task: Task
    classes: tuple[str, ...]
    groups: np.ndarray | None
    origin: str


@dataclass(frozen=True)
class Fingerprints:
    data: str
    split: str
    folds: str

    def as_dict(self) -> dict[str, str]:
        return {"data": self.data, "split": self.split, "folds": self.folds}


@dataclass(frozen=True)
class Part:
    """A subset of the table's rows (dev or test); `rows` are positions in the full table."""

    X: pd.DataFrame
    y: np.ndarray
    rows: np.ndarray
    task: Task
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DevSet(Part):
    """The dev rows and the K folds over them (positions into this set, not the table)."""

    folds: tuple[tuple[np.ndarray, np.ndarray], ...] = ()


@dataclass(frozen=True)
class FoldData:
    """One fold, preprocessed with statistics of its training rows only."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    y_mean: float = 0.0  # regression targets are standardised with training-row statistics
    y_std: float = 1.0


# --- loading ---------------------------------------------------------------------------------


def _read_file(path: Path, field: str) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: no such data file ({field}); check the path in the study file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory ({field}); give a CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix not in (".csv", ".txt", ".tsv", ""):
            raise DataError(f"{path}: unknown file type {suffix!r} ({field}); use .csv or .parquet")
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file ({field}); expected a CSV with a header row") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        detail = str(e).splitlines()[0][:120]
        raise DataError(f"{path}: not a readable CSV ({detail}); check the file") from None
    except (OSError, ValueError, ImportError) as e:
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0][:120]})") from None


def _sklearn_frame(name: str) -> tuple[pd.DataFrame, str]:
    loader = getattr(datasets, f"load_{name}")
    bunch = loader(as_frame=True)
    frame: pd.DataFrame = bunch.frame.copy()
    return frame, "target"


def _column(df: pd.DataFrame, col: str, field: str, origin: str) -> None:
    if col not in df.columns:
        hint = difflib.get_close_matches(col, [str(c) for c in df.columns], n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        cols = ", ".join(map(str, df.columns[:12])) + (", ..." if len(df.columns) > 12 else "")
        raise DataError(f"{origin}: column {col!r} ({field}) not found{did}; columns are: {cols}")


def _infer_task(y: pd.Series) -> Task:
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return "classification"
    values = y.dropna()
    whole = pd.api.types.is_integer_dtype(y) or bool((values == values.round()).all())
    if whole and values.nunique() <= 20:
        return "classification"
    return "regression"


def _check_features(X: pd.DataFrame, origin: str) -> None:
    if X.shape[1] == 0:
        raise DataError(f"{origin}: no feature columns left after 'target' and 'drop'")
    for col in X.columns:
        s = X[col]
        if s.isna().all():
            raise DataError(
                f"{origin}: column {col!r} has no values (all missing); add it to data.drop"
            )
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            if np.isinf(s.to_numpy(dtype=float, na_value=np.nan)).any():
                raise DataError(
                    f"{origin}: column {col!r} has infinite values; replace them or drop the column"
                )
            continue
        values = s.dropna()
        as_num = pd.to_numeric(values, errors="coerce")
        if as_num.notna().mean() >= 0.8:
            bad = values[as_num.isna()].iloc[0]
            raise DataError(
                f"{origin}: column {col!r} is numeric but holds text such as {str(bad)!r}; "
                "fix those cells or add the column to data.drop"
            )


def _encode_target(
    y: pd.Series, task: Task, origin: str, col: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
            raise DataError(
                f'{origin}: target {col!r} is not numeric; set data.task = "classification"'
            )
        values = y.to_numpy(dtype=float)
        if not np.isfinite(values).all():
            raise DataError(f"{origin}: target {col!r} has infinite values")
        return values, ()
    codes, uniques = pd.factorize(y, sort=True)
    if len(uniques) > MAX_CLASSES:
        raise DataError(
            f"{origin}: target {col!r} has {len(uniques)} classes; "
            'is it a regression target? set data.task = "regression"'
        )
    return codes.astype(np.int64), tuple(str(u) for u in uniques)


def load_table(ds: DataSpec, base_dir: str) -> Table:
    """Read the data set named by the study file and encode its target."""
    if ds.source is not None:
        frame, target = _sklearn_frame(ds.source.removeprefix("sklearn:"))
        origin = ds.source
    else:
        assert ds.path is not None and ds.target is not None
        path = Path(ds.path) if Path(ds.path).is_absolute() else Path(base_dir) / ds.path
        frame, target, origin = _read_file(path, "data.path"), ds.target, str(path)
    _column(frame, target, "data.target", origin)
    for col in ds.drop:
        _column(frame, col, "data.drop", origin)
    if ds.groups is not None:
        _column(frame, ds.groups, "data.groups", origin)
        if ds.groups == target:
            raise DataError(
                f"{origin}: data.groups {ds.groups!r} is the target column; "
                "name the column that groups related rows"
            )
    frame = frame[frame[target].notna()].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError(f"{origin}: target {target!r} has no values")
    y = frame[target]
    if y.nunique() < 2:
        raise DataError(
            f"{origin}: target {target!r} is constant ({y.iloc[0]!r}); nothing to learn"
        )
    task = ds.task or _infer_task(y)
    codes, classes = _encode_target(y, task, origin, target)
    groups = frame[ds.groups].to_numpy() if ds.groups else None
    X = frame.drop(columns=[target, *ds.drop, *([ds.groups] if ds.groups else [])])
    X.columns = [str(c) for c in X.columns]
    _check_features(X, origin)
    return Table(X=X, y=codes, task=task, classes=classes, groups=groups, origin=origin)


# --- split and folds -------------------------------------------------------------------------


def _split(table: Table, spec: StudySpec) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(table.y))
    ts, seed = spec.data.test_size, spec.seed
    if table.groups is not None:
        gss = GroupShuffleSplit(n_splits=1, test_size=ts, random_state=seed)
        dev, test = next(gss.split(idx, groups=table.groups))
        return np.sort(dev), np.sort(test)
    strat = table.y if table.task == "classification" else None
    if strat is not None:
        counts = np.bincount(strat, minlength=len(table.classes))
        if counts.min() < 2:
            raise DataError(
                f"{table.origin}: class {table.classes[int(counts.argmin())]!r} has "
                f"{counts.min()} row; the stratified data.test_size split needs at least 2 rows "
                "per class; drop the rare class"
            )
    try:
        dev, test = train_test_split(idx, test_size=ts, random_state=seed, stratify=strat)
    except ValueError as e:
        raise DataError(f"{table.origin}: cannot hold back data.test_size = {ts}: {e}") from None
    return np.sort(dev), np.sort(test)


def _splitter(table: Table, spec: StudySpec) -> object:
    k, r, seed = spec.cv.folds, spec.cv.repeats, spec.seed
    clf = table.task == "classification"
    if table.groups is not None:
        if r > 1:
            raise DataError(f"{table.origin}: cv.repeats > 1 cannot be combined with data.groups")
        return StratifiedGroupKFold(k, shuffle=True, random_state=seed) if clf else GroupKFold(k)
    if r > 1:
        cls = RepeatedStratifiedKFold if clf else RepeatedKFold
        return cls(n_splits=k, n_repeats=r, random_state=seed)
    return (StratifiedKFold if clf else KFold)(k, shuffle=True, random_state=seed)


def _folds(
    table: Table, spec: StudySpec, dev: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    k = spec.cv.folds
    if len(dev) < 2 * k:
        raise DataError(
            f"{table.origin}: {len(dev)} dev rows are too few for cv.folds = {k}; "
            "use fewer folds or more data"
        )
    y = table.y[dev]
    if table.task == "classification":
        smallest = int(np.bincount(y, minlength=len(table.classes)).min())
        if smallest < k:
            cls = table.classes[int(np.argmin(np.bincount(y, minlength=len(table.classes))))]
            raise DataError(
                f"{table.origin}: class {cls!r} has {smallest} dev rows, fewer than cv.folds = {k}; "
                "lower cv.folds or drop the rare class"
            )
    groups = table.groups[dev] if table.groups is not None else None
    splitter = _splitter(table, spec)
    try:
        return tuple(
            (np.asarray(tr), np.asarray(va))
            for tr, va in splitter.split(np.zeros(len(dev)), y, groups)  # type: ignore[attr-defined]
        )
    except ValueError as e:
        raise DataError(f"{table.origin}: cannot make cv.folds = {k} folds: {e}") from None


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def _fingerprints(
    table: Table,
    dev: np.ndarray,
    test: np.ndarray,
    folds: tuple[tuple[np.ndarray, np.ndarray], ...],
) -> Fingerprints:
    rows = pd.util.hash_pandas_object(table.X, index=False).to_numpy().tobytes()
    header = "|".join(f"{c}:{t}" for c, t in table.X.dtypes.astype(str).items()).encode()
    data = _sha(
        header, rows, np.ascontiguousarray(table.y).tobytes(), "|".join(table.classes).encode()
    )
    split = _sha(test.astype(np.int64).tobytes(), dev.astype(np.int64).tobytes())
    fold_fp = _sha(*(va.astype(np.int64).tobytes() for _, va in folds))
    return Fingerprints(data=data, split=split, folds=fold_fp)


@dataclass(frozen=True)
class Prepared:
    table: Table
    dev: np.ndarray
    test: np.ndarray
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]
    fingerprints: Fingerprints


def _check_metric(table: Table, name: str) -> None:
    """The study's metric must score the data's task (and `f1` needs exactly two classes)."""
    metric = metrics.get(name)
    if metric.task != table.task:
        fits = ", ".join(m.name for m in metrics.METRICS.values() if m.task == table.task)
        raise DataError(
            f"{table.origin}: metric {name!r} scores {metric.task}, but this is a {table.task} "
            f"task; use one of {fits}, or set data.task"
        )
    if name == "f1" and len(table.classes) != 2:
        raise DataError(
            f"{table.origin}: metric 'f1' needs 2 classes, the target has {len(table.classes)} "
            "classes; use f1_macro or f1_weighted"
        )


def prepare(spec: StudySpec) -> Prepared:
    """Load the data and fix the split and folds; nothing here is handed to a trial yet."""
    table = load_table(spec.data, spec.base_dir)
    _check_metric(table, spec.metric)
    dev, test = _split(table, spec)
    folds = _folds(table, spec, dev)
    return Prepared(table, dev, test, folds, _fingerprints(table, dev, test, folds))


def _part(table: Table, rows: np.ndarray) -> dict[str, object]:
    return {
        "X": table.X.iloc[rows].reset_index(drop=True),
        "y": table.y[rows],
        "rows": rows,
        "task": table.task,
        "classes": table.classes,
    }


def dev_set(prep: Prepared) -> DevSet:
    """The dev rows with their folds: all that a trial may see."""
    return DevSet(**_part(prep.table, prep.dev), folds=prep.folds)  # type: ignore[arg-type]


def test_set(prep: Prepared) -> Part:
    """The held-out test rows. Called only by the lockbox (`final`), after it has been claimed."""
    return Part(**_part(prep.table, prep.test))  # type: ignore[arg-type]


# --- preprocessing ---------------------------------------------------------------------------


def make_preprocessor(X: pd.DataFrame) -> ColumnTransformer:
    """Impute + scale numeric columns, impute + one-hot categorical ones (unknown categories → 0)."""
    numeric = [
        c
        for c in X.columns
        if pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])
    ]
    categorical = [c for c in X.columns if c not in numeric]
    num = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    cat = Pipeline(
        [
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
        ]
    )
    return ColumnTransformer(
        [("num", num, numeric), ("cat", cat, categorical)],
        sparse_threshold=0.0,
        verbose_feature_names_out=False,
    )


def _as_object(X: pd.DataFrame) -> pd.DataFrame:
    cat = [
        c
        for c in X.columns
        if not pd.api.types.is_numeric_dtype(X[c]) or pd.api.types.is_bool_dtype(X[c])
    ]
    if not cat:
        return X
    out = X.copy()
    for c in cat:  # one dtype for strings, bools and missing values alike
        out[c] = out[c].astype(object).where(out[c].notna(), np.nan)
    return out


def fit_transform(
    X_train: pd.DataFrame, *others: pd.DataFrame
) -> tuple[ColumnTransformer, list[np.ndarray]]:
    """Fit the preprocessor on `X_train` only; transform it and every other frame with it."""
    pre = make_preprocessor(X_train)
    train = pre.fit_transform(_as_object(X_train)).astype(np.float32)
    return pre, [train, *(pre.transform(_as_object(o)).astype(np.float32) for o in others)]


def transform(pre: ColumnTransformer, X: pd.DataFrame) -> np.ndarray:
    return np.asarray(pre.transform(_as_object(X)), dtype=np.float32)


def fold_data(dev: DevSet, k: int) -> FoldData:
    """Fold k's arrays; every statistic (imputation, scaling, categories, target scale) from its
    training rows only."""
    tr, va = dev.folds[k]
    _, (x_tr, x_va) = fit_transform(dev.X.iloc[tr], dev.X.iloc[va])
    y_tr, y_va = dev.y[tr], dev.y[va]
    if dev.task == "regression":
        mean, std = float(y_tr.mean()), float(y_tr.std()) or 1.0
        return FoldData(x_tr, ((y_tr - mean) / std).astype(np.float32), x_va, y_va, mean, std)
    return FoldData(x_tr, y_tr, x_va, y_va)


def iter_folds(dev: DevSet) -> Iterator[FoldData]:
    for k in range(len(dev.folds)):
        yield fold_data(dev, k)
