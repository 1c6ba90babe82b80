"""Data: load a table, hold back the test rows, fix the K folds, preprocess inside each fold.

Only `load_test` ever materialises test rows, and only `final` calls it. Everything the search sees
comes from `load_dev`, whose rows are the dev part of the seeded split.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
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
    notes: tuple[str, ...] = ()  # what was done to the data without being asked, one line each


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

# The largest magnitude a feature or target may have: float32 (what trials train on) ends at
# 3.4e38, and the scaled values, squares and sums of a column near that overflow.
FLOAT32_SAFE = 1e38
# A categorical column with more distinct values than ID_LEVELS and than ID_SHARE of its rows is
# an identifier (a name, a key): one-hot encoded it adds a feature per row that no other row
# shares, and it once cost 1.9 GiB a fold. Such a column is refused, not encoded.
ID_LEVELS = 50
ID_SHARE = 0.5
# A text column whose values are mostly numbers (more than NUMERIC_SHARE of them) is a numeric
# column with typos or markers in it, not a category: refused, naming the first text value.
NUMERIC_SHARE = 0.5
# The most of this machine's memory one worker's preprocessed folds may take: beyond it even
# `--workers 1` would not train (each of several workers on a machine holds its own copy).
MEMORY_SHARE = 0.5


def _read_file(path: Path, field: str) -> pd.DataFrame:
    _regular_file(path, field)
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix not in (".csv", ".txt", ".tsv", ""):
            raise DataError(f"{path}: unknown file type {suffix!r} ({field}); use .csv or .parquet")
        sep = _separator(path)
        frame = pd.read_csv(path, sep=sep)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file ({field}); expected a CSV with a header row") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        detail = str(e).splitlines()[0][:120]
        raise DataError(f"{path}: not a readable CSV ({detail}); check the file") from None
    except (OSError, ValueError, ImportError) as e:
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0][:120]})") from None
    _check_separator(path, frame, sep)
    return frame


# Separators files use between fields: a header read as one column holding another than the one
# expected is a file that does not use it (a spreadsheet's ';' export, commas in a .tsv).
OTHER_SEPARATORS = {";": "';'", "\t": "tabs", "|": "'|'", ",": "','"}


def _check_separator(path: Path, frame: pd.DataFrame, sep: str) -> None:
    """A CSV whose header is one column holding another separator is refused, with what to do
    (read as it is, every field of a row would be one text value)."""
    if frame.shape[1] != 1:
        return
    header = str(frame.columns[0])
    expected = OTHER_SEPARATORS[sep]
    for other, name in OTHER_SEPARATORS.items():
        if other in header and other != sep:
            fix = (
                "name it .csv, or save it with tabs"
                if other == ","
                else "save it with ',' between fields (and '.' for decimals), or with tabs as .tsv"
            )
            raise DataError(
                f"{path}: the header is one column, {header[:60]!r}, so the file seems to use "
                f"{name} between fields; selector reads {expected} in a {path.suffix or 'CSV'} "
                f"file: {fix}"
            )


def _regular_file(path: Path, field: str) -> None:
    """Only a regular file is read: a FIFO would block for ever, /dev/zero fill the memory."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such data file ({field}); check the path in the study file"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}) ({field})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory ({field}); give a CSV or Parquet file")
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{path}: not a regular file (a pipe, socket or device) ({field}); "
            "give a CSV or Parquet file"
        )


def _separator(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() not in (".parquet", ".pq")


def _short_rows(path: Path, frame: pd.DataFrame, origin: str) -> list[str]:
    """A note on CSV rows with fewer fields than the header, which pandas pads with missing
    values without a word. Such rows end in a missing value, so files without one are not
    scanned again."""
    if frame.shape[1] == 0 or not frame.iloc[:, -1].isna().any():
        return []
    width, short, first = frame.shape[1], 0, 0
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        rows = (r for r in csv.reader(fh, delimiter=_separator(path)) if r)
        next(rows, None)  # the header
        for number, row in enumerate(rows, start=1):
            if len(row) < width:
                short, first = short + 1, first or number
    if not short:
        return []
    return [
        f"{origin}: {short} rows have fewer fields than the header's {width} (the first is row "
        f"{first}); their missing fields were read as missing values"
    ]


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


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _shown(value: object) -> str:
    """A cell as a message shows it: 1, not np.int64(1)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _row(s: pd.Series, mask: np.ndarray) -> tuple[int, object]:
    """The row number (counted from 1 after the header) and value of the first row in `mask`."""
    at = int(np.flatnonzero(mask)[0])
    return int(s.index[at]) + 1, s.iloc[at]


def _drop_hint(drop: list[str], col: str) -> str:
    """The study file's line that drops `col` as well."""
    return "drop = [" + ", ".join(json.dumps(c) for c in [*drop, col]) + "] in [data]"


def check_magnitude(s: pd.Series, what: str, origin: str, fix: str) -> None:
    """Refuse infinite values, and values too large for float32 to train on (`origin`, where
    they are, starts the message unless empty)."""
    values = s.to_numpy(dtype=float, na_value=np.nan)
    at = f"{origin}: " if origin else ""
    inf = np.isinf(values)
    if inf.any():
        row, value = _row(s, inf)
        raise DataError(
            f"{at}{what} has infinite values (the first, {value}, in row {row}); replace them{fix}"
        )
    huge = np.abs(values) > FLOAT32_SAFE
    if huge.any():
        row, value = _row(s, huge)
        raise DataError(
            f"{at}{what} has values beyond ±{FLOAT32_SAFE:g} (the first, {value:g}, in row "
            f"{row}), which overflow float32 when scaled; rescale it (other units, a log){fix}"
        )


def _check_text(s: pd.Series, col: str, origin: str, leave_out: Callable[[str], str]) -> None:
    """A text column that mostly holds numbers has typos or markers in it: refused."""
    values = s.dropna()
    values = values[[not isinstance(v, bool | np.bool_) for v in values]]
    if len(values) == 0:
        return
    as_num = pd.to_numeric(values, errors="coerce")
    text = as_num.isna().to_numpy()
    if text.all() or not text.any() or (~text).mean() <= NUMERIC_SHARE:
        return  # text, numbers stored as text (codes), or a mix that is mostly text
    row, bad = _row(values, text)
    raise DataError(
        f"{origin}: column {col!r} is numeric but holds text such as {str(bad)!r} (row {row}); "
        f"fix those cells, or leave the column out ({leave_out(col)})"
    )


def _check_levels(s: pd.Series, col: str, origin: str, leave_out: Callable[[str], str]) -> None:
    """A categorical column with about one value per row is an identifier: refused."""
    present = int(s.notna().sum())
    levels = int(s.nunique())
    if levels > ID_LEVELS and levels > ID_SHARE * present:
        raise DataError(
            f"{origin}: column {col!r} has {levels} distinct values in {present} rows, like an "
            f"identifier; one-hot encoded it would add {levels} features no other row shares: "
            f"leave it out ({leave_out(col)})"
        )


def check_features(X: pd.DataFrame, origin: str, leave_out: Callable[[str], str]) -> None:
    """Refuse feature columns no model can train on (empty, infinite or huge values, typos in
    numbers, identifiers). `leave_out(column)` says how to leave a column out: the study file's
    line, or (the estimators) what to do to X."""
    for col in X.columns:
        s = X[col]
        if s.isna().all():
            raise DataError(
                f"{origin}: column {col!r} has no values (all missing); leave it out "
                f"({leave_out(col)})"
            )
        if _is_numeric(s):
            check_magnitude(s, f"column {col!r}", origin, f", or leave it out ({leave_out(col)})")
            continue
        _check_text(s, col, origin, leave_out)
        _check_levels(s, col, origin, leave_out)


def _encode_target(
    y: pd.Series, task: Task, origin: str, col: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    if task == "regression":
        if not _is_numeric(y):
            raise DataError(
                f'{origin}: target {col!r} is not numeric; set data.task = "classification"'
            )
        check_magnitude(y, f"target {col!r}", origin, "")
        return y.to_numpy(dtype=float), ()
    codes, uniques = pd.factorize(y, sort=True)
    if len(uniques) > MAX_CLASSES:
        raise DataError(
            f"{origin}: target {col!r} has {len(uniques)} classes; "
            'is it a regression target? set data.task = "regression"'
        )
    return codes.astype(np.int64), tuple(str(u) for u in uniques)


def _check_groups(g: pd.Series, col: str, origin: str) -> None:
    """The groups column must put every row in a group, and have at least two groups."""
    missing = g.isna().to_numpy()
    if missing.any():
        row, _ = _row(g, missing)
        raise DataError(
            f"{origin}: data.groups column {col!r} has missing values (the first in row {row}); "
            "give every row a group, or drop those rows"
        )
    if g.nunique() < 2:
        raise DataError(
            f"{origin}: data.groups column {col!r} is constant ({_shown(g.iloc[0])}): one group "
            "cannot be split into dev and test rows; name the column that groups related rows"
        )


def _read(ds: DataSpec, base_dir: str) -> tuple[pd.DataFrame, str, str, list[str]]:
    """The data set's frame, its target column, where it came from, and notes on the reading."""
    if ds.source is not None:
        frame, target = _sklearn_frame(ds.source.removeprefix("sklearn:"))
        return frame, target, ds.source, []
    path = ds.file(base_dir)
    assert path is not None and ds.target is not None
    frame = _read_file(path, "data.path")
    notes = _short_rows(path, frame, str(path)) if _is_csv(path) else []
    return frame, ds.target, str(path), notes


def _drop_missing_target(
    frame: pd.DataFrame, target: str, origin: str
) -> tuple[pd.DataFrame, list[str]]:
    """The rows with a target; the others are left out, and a note says how many."""
    keep = frame[target].notna()
    if not keep.any():
        raise DataError(f"{origin}: target {target!r} has no values")
    if keep.all():
        return frame, []
    left_out = int((~keep).sum())
    note = (
        f"{origin}: {left_out} of {len(frame)} rows have no value in the target {target!r} and "
        f"were left out ({int(keep.sum())} rows remain)"
    )
    return frame[keep], [note]


def load_table(ds: DataSpec, base_dir: str) -> Table:
    """Read the data set named by the study file and encode its target.

    Rows keep their position in the file (counted from 1 after the header) until every check has
    run, so that a message names the row at fault."""
    frame, target, origin, notes = _read(ds, base_dir)
    frame = frame.reset_index(drop=True)
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
    frame, dropped = _drop_missing_target(frame, target, origin)
    y = frame[target]
    if y.nunique() < 2:
        raise DataError(
            f"{origin}: target {target!r} is constant ({_shown(y.iloc[0])}); nothing to learn"
        )
    task = ds.task or _infer_task(y)
    codes, classes = _encode_target(y, task, origin, target)
    if ds.groups is not None:
        _check_groups(frame[ds.groups], ds.groups, origin)
    groups = frame[ds.groups].to_numpy() if ds.groups else None
    X = frame.drop(columns=[target, *ds.drop, *([ds.groups] if ds.groups else [])])
    X.columns = [str(c) for c in X.columns]
    if X.shape[1] == 0:
        raise DataError(f"{origin}: no feature columns left after 'target' and 'drop'")
    check_features(X, origin, lambda col: _drop_hint(ds.drop, col))
    return Table(
        X=X.reset_index(drop=True),
        y=codes,
        task=task,
        classes=classes,
        groups=groups,
        origin=origin,
        notes=(*notes, *dropped),
    )


# --- split and folds -------------------------------------------------------------------------


def _split(table: Table, spec: StudySpec) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(table.y))
    ts, seed = spec.data.test_size, spec.seed
    if ts == 0:  # no test set: every row is a dev row
        return idx, idx[:0]
    if table.groups is not None:
        gss = GroupShuffleSplit(n_splits=1, test_size=ts, random_state=seed)
        try:
            dev, test = next(gss.split(idx, groups=table.groups))
        except ValueError as e:
            raise DataError(
                f"{table.origin}: cannot hold back data.test_size = {ts} of the "
                f"{len(np.unique(table.groups))} data.groups: {str(e).splitlines()[0]}"
            ) from None
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

    @property
    def notes(self) -> tuple[str, ...]:
        """What was done to the data without being asked (rows left out, short rows padded), one
        line each: for `create`'s output and the study's `data_notes`."""
        return self.table.notes


def metric_misfit(name: str, task: Task, n_classes: int) -> tuple[str, str] | None:
    """Why the metric `name` cannot score this task's targets, and which can (None: it can):
    it must score the task, and `f1` needs exactly two classes."""
    metric = metrics.get(name)
    if metric.task != task:
        fits = ", ".join(m.name for m in metrics.METRICS.values() if m.task == task)
        return (
            f"metric {name!r} scores {metric.task}, but this is a {task} task",
            f"use one of {fits}",
        )
    if name == "f1" and n_classes != 2:
        return (
            f"metric 'f1' needs 2 classes, the target has {n_classes} classes",
            "use f1_macro or f1_weighted",
        )
    return None


def _check_metric(table: Table, name: str) -> None:
    misfit = metric_misfit(name, table.task, len(table.classes))
    if misfit is not None:
        problem, fix = misfit
        task = ", or set data.task" if metrics.get(name).task != table.task else ""
        raise DataError(f"{table.origin}: {problem}; {fix}{task}")


def _memory_bytes() -> int:
    """This machine's memory, or the container's limit where that is lower (cgroup v2)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return int(total)
    return int(min(total, int(limit))) if limit.isdigit() else int(total)


def encoded_width(X: pd.DataFrame) -> tuple[int, dict[str, int]]:
    """The preprocessed width (one feature per numeric column, one per level of a categorical
    one) and the levels of each categorical column: known before anything is allocated."""
    levels = {str(c): int(X[c].nunique()) for c in X.columns if not _is_numeric(X[c])}
    return X.shape[1] - len(levels) + sum(levels.values()), levels


def _check_memory(table: Table, dev_rows: int, n_folds: int, drop: list[str]) -> None:
    """Refuse data whose preprocessed folds would not fit: a worker keeps every fold (training
    and validation rows, float32), and a fold's one-hot encoding passes through float64 twice."""
    width, levels = encoded_width(table.X)
    need = dev_rows * width * (4 * n_folds + 16)
    have = MEMORY_SHARE * _memory_bytes()
    if need <= have:
        return
    gib = f"{need / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of this machine's memory"
    widest = max(levels, key=levels.__getitem__, default=None)
    if widest is not None and levels[widest] > width - sum(levels.values()):
        raise DataError(
            f"{table.origin}: column {widest!r} has {levels[widest]} distinct values; one-hot "
            f"encoded, the {n_folds} folds of {dev_rows} rows would take {gib}: "
            f"leave it out ({_drop_hint(drop, widest)})"
        )
    raise DataError(
        f"{table.origin}: the {n_folds} folds of {dev_rows} rows x {width} features would take "
        f"{gib}; use fewer rows or columns (data.drop)"
    )


def prepare(spec: StudySpec) -> Prepared:
    """Load the data and fix the split and folds; nothing here is handed to a trial yet."""
    table = load_table(spec.data, spec.base_dir)
    _check_metric(table, spec.metric)
    dev, test = _split(table, spec)
    folds = _folds(table, spec, dev)
    _check_memory(table, len(dev), len(folds), spec.data.drop)
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
