"""The final model's files, none of which runs code when loaded.

- `model.pt`: the refit network's state_dict, loaded back with `torch.load(weights_only=True)`;
- `preprocess.json`: the statistics of the preprocessing fit on all dev rows (medians, means,
  scales, fill values, categories, column order), replayed in numpy by `transform`;
- `model.json`: what rebuilds the network and reads its output (config, task, classes, target
  column and scaling, metric).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from sklearn.compose import ColumnTransformer

from selector import metrics
from selector.errors import DataError, SelectorError, StorageError
from selector.metrics import Task
from selector.model import MLP, build_mlp
from selector.space import TrialConfig
from selector.spec import check_space_value

FORMAT = 1
WEIGHTS, PREPROCESS, META = "model.pt", "preprocess.json", "model.json"
T = TypeVar("T")
# What a category or fill value can be in JSON: categories are strings, numbers or booleans.
Scalar = str | bool | int | float


@dataclass(frozen=True)
class Preprocess:
    """Median imputation + standard scaling of numeric columns, most-frequent imputation + one-hot
    encoding of categorical ones (an unknown category encodes as all zeros)."""

    columns: list[str]  # the input feature columns, in the order the study read them
    numeric: list[str]
    medians: list[float]
    means: list[float]
    scales: list[float]
    categorical: list[str]
    fills: list[Scalar]
    categories: list[list[Scalar]]

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categories)


@dataclass(frozen=True)
class Meta:
    task: Task
    metric: str
    target: str | None
    classes: list[str]
    n_in: int
    n_out: int
    y_mean: float
    y_std: float
    config: dict[str, Any]
    study: str
    trial: int


@dataclass(frozen=True)
class Bundle:
    model: MLP
    pre: Preprocess
    meta: Meta


def _py(value: Any) -> Any:
    """A JSON scalar for a numpy scalar."""
    return value.item() if isinstance(value, np.generic) else value


def _fitted(pre: ColumnTransformer, name: str) -> tuple[Any, list[str]] | None:
    for tname, trans, cols in pre.transformers_:
        if tname == name and len(cols) > 0:
            return trans, [str(c) for c in cols]
    return None


def from_sklearn(pre: ColumnTransformer, columns: list[str]) -> Preprocess:
    """The statistics of `data.make_preprocessor`'s fitted ColumnTransformer, as plain values."""
    numeric, medians, means, scales = [], [], [], []
    if (num := _fitted(pre, "num")) is not None:
        pipe, cols = num
        stats = pipe.named_steps["impute"].statistics_
        kept = [c for c, m in zip(cols, stats, strict=True) if not math.isnan(m)]
        scaler = pipe.named_steps["scale"]
        numeric, medians = kept, [float(m) for m in stats if not math.isnan(m)]
        means, scales = [float(m) for m in scaler.mean_], [float(s) for s in scaler.scale_]
    categorical: list[str] = []
    fills: list[Scalar] = []
    categories: list[list[Scalar]] = []
    if (cat := _fitted(pre, "cat")) is not None:
        pipe, categorical = cat
        fills = [_py(v) for v in pipe.named_steps["impute"].statistics_]
        categories = [[_py(v) for v in c] for c in pipe.named_steps["onehot"].categories_]
    return Preprocess(columns, numeric, medians, means, scales, categorical, fills, categories)


def missing_columns(pre: Preprocess, X: pd.DataFrame) -> list[str]:
    return [c for c in pre.columns if c not in X.columns]


def _numeric(X: pd.DataFrame, col: str) -> np.ndarray:
    s = X[col]
    try:
        values = pd.to_numeric(s, errors="raise")
    except (ValueError, TypeError):
        bad = s[pd.to_numeric(s, errors="coerce").isna() & s.notna()].iloc[0]
        raise DataError(
            f"column {col!r} is numeric in the training data but holds {str(bad)!r} here"
        ) from None
    return np.asarray(values, dtype=np.float64)


def transform(pre: Preprocess, X: pd.DataFrame) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """The model's input for the rows of `X` (float32), and the unknown categories per column.

    Equal to the fitted ColumnTransformer's output on the same rows."""
    missing = missing_columns(pre, X)
    if missing:
        raise DataError(f"feature column {missing[0]!r} is missing (the model needs {pre.columns})")
    parts: list[np.ndarray] = []
    for col, median, mean, scale in zip(
        pre.numeric, pre.medians, pre.means, pre.scales, strict=True
    ):
        x = _numeric(X, col)
        parts.append(((np.where(np.isnan(x), median, x) - mean) / scale)[:, None])
    unknown: dict[str, list[Any]] = {}
    for col, fill, cats in zip(pre.categorical, pre.fills, pre.categories, strict=True):
        raw = X[col].astype(object)
        values = np.asarray(raw.where(raw.notna(), fill), dtype=object)
        onehot = np.stack([values == c for c in cats], axis=1).astype(np.float64)
        seen = onehot.sum(axis=1) > 0
        if not seen.all():
            unknown[col] = sorted({str(v) for v in values[~seen]})
        parts.append(onehot)
    if not parts:
        return np.zeros((len(X), 0), dtype=np.float32), unknown
    return np.concatenate(parts, axis=1).astype(np.float32), unknown


# --- writing: into a directory of selector's own, never through a link ----------------------


def check_directory(path: Path) -> None:
    """`path` must be a real directory or not exist yet: a symbolic link planted there would send
    the model (and every later write) wherever it points."""
    if path.is_symlink():
        raise StorageError(
            f"{path}: is a symbolic link (to {os.readlink(path)}); selector saves the final "
            "model only into a directory of its own: remove the link and run again"
        )
    if path.exists() and not path.is_dir():
        raise StorageError(f"{path}: is not a directory; move it away and run again")


def _open_dir(path: Path) -> int:
    """A descriptor of directory `path` (created if missing), opened without following a link."""
    check_directory(path.parent)
    check_directory(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"{path}: cannot open the model directory ({e.strerror})") from None


@contextlib.contextmanager
def _created(dir_fd: int, out: Path, name: str) -> Iterator[BinaryIO]:
    """File `name` in the directory `dir_fd`, created or emptied, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    except OSError as e:
        why = "is a symbolic link; remove it" if e.errno == errno.ELOOP else e.strerror
        raise StorageError(f"{out / name}: cannot write the model file ({why})") from None
    with os.fdopen(fd, "wb") as fh:
        yield fh


def write_file(out: Path, name: str, content: bytes) -> None:
    """Write `out/name` as `save` writes the model's files (no link followed)."""
    dir_fd = _open_dir(out)
    try:
        with _created(dir_fd, out, name) as fh:
            fh.write(content)
    finally:
        os.close(dir_fd)


def save(out: Path, model: torch.nn.Module, pre: Preprocess, meta: Meta) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dir_fd = _open_dir(out)
    try:
        with _created(dir_fd, out, WEIGHTS) as fh:
            torch.save(state, fh)
        for name, doc in ((PREPROCESS, asdict(pre)), (META, asdict(meta))):
            with _created(dir_fd, out, name) as fh:
                fh.write(json.dumps({"format": FORMAT, **doc}, indent=1).encode())
    finally:
        os.close(dir_fd)


# --- reading: every field typed and checked, so a damaged file is named, never a traceback ---


def _damaged(path: Path, problem: str) -> SelectorError:
    return SelectorError(
        f"{path}: {problem}; the saved model is damaged or was edited: restore "
        f"{path.parent} from a copy (`selector final` saves it once, with the test score)"
    )


def _schema(cls: type) -> type[BaseModel]:
    """A strict pydantic model of dataclass `cls`'s fields (no coercion, no unknown keys)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)}
    return create_model(
        f"{cls.__name__}File", __config__=ConfigDict(strict=True, extra="forbid"), **fields
    )


_SCHEMAS = {Preprocess: _schema(Preprocess), Meta: _schema(Meta)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SelectorError(f"{path}: missing; the final model's files are incomplete") from None
    except (OSError, ValueError) as e:
        raise _damaged(path, f"unreadable ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT:
        raise _damaged(path, f"not a selector model file of format {FORMAT}")
    return doc


def _typed(cls: type[T], path: Path) -> T:
    try:
        checked = _SCHEMAS[cls].model_validate(_read_json(path))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise _damaged(path, f"field {where}: {first['msg']}") from None
    return cls(**checked.model_dump())


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _preprocess_problem(pre: Preprocess) -> str | None:
    """What is inconsistent in the preprocessing statistics, if anything."""
    n_num, n_cat = len(pre.numeric), len(pre.categorical)
    if not len(pre.medians) == len(pre.means) == len(pre.scales) == n_num:
        return "medians, means and scales do not match the numeric columns"
    if not len(pre.fills) == len(pre.categories) == n_cat:
        return "fills and categories do not match the categorical columns"
    if len(set(pre.columns)) != len(pre.columns):
        return "a column is listed twice"
    if not set(pre.numeric) | set(pre.categorical) <= set(pre.columns):
        return "an encoded column is not among the input columns"
    if not (_finite(pre.medians) and _finite(pre.means) and _finite(pre.scales)):
        return "a median, mean or scale is not a finite number"
    if any(s <= 0 for s in pre.scales):
        return "a scale is not positive"
    if any(not c for c in pre.categories):
        return "a categorical column has no categories"
    return None


def _config_problem(config: dict[str, Any]) -> str | None:
    known = {f.name for f in dataclasses.fields(TrialConfig)}
    for key, value in config.items():
        if key not in known:
            return f"config has an unknown key {key!r}"
        try:
            check_space_value(key, value)
        except ValueError as e:
            return f"config.{key}: {e}"
    return None


def _meta_problem(meta: Meta, pre: Preprocess) -> str | None:
    """What is inconsistent in the model's metadata (or with the preprocessing), if anything."""
    if (problem := _config_problem(meta.config)) is not None:
        return problem
    if meta.metric not in metrics.METRICS or metrics.get(meta.metric).task != meta.task:
        return f"metric {meta.metric!r} does not score a {meta.task} task"
    if meta.n_in != pre.n_features:
        return f"n_in = {meta.n_in}, but {PREPROCESS} encodes {pre.n_features} features"
    if meta.task == "classification" and not meta.n_out == len(meta.classes) >= 2:
        return f"n_out = {meta.n_out} does not match its {len(meta.classes)} classes"
    if meta.task == "regression" and meta.n_out != 1:
        return f"n_out = {meta.n_out}, but a regression model has one output"
    if not (math.isfinite(meta.y_mean) and math.isfinite(meta.y_std) and meta.y_std > 0):
        return "the target's mean or scale is not a finite number"
    return None


def _weights(path: Path, model: MLP) -> None:
    """Load `model.pt` into `model`: plain tensors of the right shapes, all finite."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SelectorError(f"{path}: missing; the final model's files are incomplete") from None
    except Exception as e:  # torch raises what its unpickler and zip reader meet, of any type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _damaged(path, f"cannot load the weights ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _damaged(path, "not a table of weight tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for MLP:", then the details
        detail = " ".join(str(e).split()).removeprefix("Error(s) in loading state_dict for MLP:")
        raise _damaged(
            path, f"the weights do not fit the network in {META} ({detail.strip()[:160]})"
        ) from None
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise _damaged(path, "a weight is not a finite number")


def load(out: Path) -> Bundle:
    """The final model from its directory, executing no code stored there; every file is
    checked, and a damaged one is named."""
    pre = _typed(Preprocess, out / PREPROCESS)
    if (problem := _preprocess_problem(pre)) is not None:
        raise _damaged(out / PREPROCESS, problem)
    meta = _typed(Meta, out / META)
    if (problem := _meta_problem(meta, pre)) is not None:
        raise _damaged(out / META, problem)
    model = build_mlp(TrialConfig(**meta.config), meta.n_in, meta.n_out)
    _weights(out / WEIGHTS, model)
    model.eval()
    return Bundle(model, pre, meta)
